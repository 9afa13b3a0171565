#!/usr/bin/env bash
# Reference RAKP values for the unit tests in src/ipmi/crypto.rs, computed with OpenSSL (an
# implementation independent of kiln's) over the field order of IPMI 2.0 §13.31–13.32.
# Inputs: console session id a0a1a2a3, managed session id b0b1b2b3, random numbers 11…/22…,
# GUID 33…, role 0x14, user "admin", password "s3cret".
set -euo pipefail
cd "$(dirname "$0")"

hmac() { # hash hexkey hexdata
  echo -n "$3" | xxd -r -p | openssl dgst -"$1" -mac HMAC -macopt "hexkey:$2" -r | cut -d' ' -f1
}
rep() { printf "%0.s$1" $(seq 1 "$2"); }

csid=a3a2a1a0 msid=b3b2b1b0
crand=$(rep 11 16) mrand=$(rep 22 16) guid=$(rep 33 16)
role=14 user=$(printf admin | xxd -p) ulen=05
kuid=$(printf s3cret | xxd -p)$(rep 00 14)

{
  for pair in s3:sha1:12:20 s17:sha256:16:32; do
    IFS=: read -r tag hash icv n <<<"$pair"
    echo "$tag-rakp2 $(hmac "$hash" "$kuid" "$csid$msid$crand$mrand$guid$role$ulen$user")"
    echo "$tag-rakp3 $(hmac "$hash" "$kuid" "$mrand$csid$role$ulen$user")"
    sik=$(hmac "$hash" "$kuid" "$crand$mrand$role$ulen$user")
    echo "$tag-sik $sik"
    r4=$(hmac "$hash" "$sik" "$crand$msid$guid")
    echo "$tag-rakp4 ${r4:0:$((icv * 2))}"
    echo "$tag-k1 $(hmac "$hash" "$sik" "$(rep 01 "$n")")"
    k2=$(hmac "$hash" "$sik" "$(rep 02 "$n")")
    echo "$tag-aes ${k2:0:32}"
  done
} > rakp-vectors.txt
