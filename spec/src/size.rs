//! Byte sizes written the way people write them: `"8GiB"`, `"512MiB"`, `"1TB"`, or a plain
//! number of bytes.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// The JSON Schema `format` of a [`ByteSize`]; the document checker knows it.
pub const BYTE_SIZE_FORMAT: &str = "kiln-byte-size";

/// A number of bytes. Parses binary units (`KiB`, `MiB`, `GiB`, `TiB`), decimal units (`kB`,
/// `MB`, `GB`, `TB`), `B`, or a bare integer; prints the largest binary unit that is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn bytes(self) -> u64 {
        self.0
    }

    pub const fn mib(n: u64) -> ByteSize {
        ByteSize(n * MIB)
    }

    pub const fn gib(n: u64) -> ByteSize {
        ByteSize(n * GIB)
    }
}

const UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KiB", KIB),
    ("MiB", MIB),
    ("GiB", GIB),
    ("TiB", TIB),
    ("kB", 1_000),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

/// Why a size could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a size like \"512MiB\", \"8GiB\" or a number of bytes")]
pub struct ParseSizeError(pub String);

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || ParseSizeError(text.to_string());
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        if digits.is_empty() {
            return Err(err());
        }
        let n: u64 = digits.parse().map_err(|_| err())?;
        let unit = unit.trim_start();
        let factor = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, f)| *f)
                .ok_or_else(err)?
        };
        n.checked_mul(factor).map(ByteSize).ok_or_else(err)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, factor) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if n >= factor && n.is_multiple_of(factor) {
                return write!(f, "{}{unit}", n / factor);
            }
        }
        write!(f, "{n}B")
    }
}

impl ByteSize {
    /// Approximate, for messages: `"7.5 GiB"`.
    pub fn human(self) -> String {
        let n = self.0 as f64;
        for (unit, factor) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if self.0 >= factor {
                return format!("{:.1} {unit}", n / factor as f64);
            }
        }
        format!("{} B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size like \"8GiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // anyOf rather than a type list, with Kubernetes' int-or-string marker, so the same
        // schema is also a structural one in custom resource definitions.
        json_schema!({
            "description": "A size: \"512MiB\", \"8GiB\", \"1TB\" or a number of bytes",
            "x-kubernetes-int-or-string": true,
            "anyOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "format": BYTE_SIZE_FORMAT },
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_prints_the_exact_binary_unit() {
        assert_eq!("8GiB".parse::<ByteSize>().unwrap(), ByteSize(8 * GIB));
        assert_eq!("512 MiB".parse::<ByteSize>().unwrap(), ByteSize(512 * MIB));
        assert_eq!(
            "1TB".parse::<ByteSize>().unwrap(),
            ByteSize(1_000_000_000_000)
        );
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!(ByteSize(8 * GIB).to_string(), "8GiB");
        assert_eq!(ByteSize(1536 * MIB).to_string(), "1536MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
        assert_eq!(ByteSize(3 * GIB / 2).human(), "1.5 GiB");
    }

    #[test]
    fn refuses_what_is_not_a_size() {
        for bad in ["", "GiB", "8 gigs", "-1", "1.5GiB", "99999999999TiB"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?} parsed");
        }
    }
}
