//! The authoritative server's address pool: offers, bindings, releases, declines and static
//! reservations (pure), persisted as one JSON file written atomically.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const LEASES_FILE: &str = "leases.json";

/// How long an offered address is held for the client that was offered it.
pub const OFFER_HOLD_SECS: u64 = 60;
/// How long a declined address (in use by someone else) stays out of the pool.
pub const DECLINE_HOLD_SECS: u64 = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseState {
    Offered,
    Bound,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Lease {
    pub mac: String,
    pub ip: Ipv4Addr,
    pub state: LeaseState,
    /// Seconds since the Unix epoch.
    pub expires: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("no free address left in {start}–{end}")]
    Exhausted { start: Ipv4Addr, end: Ipv4Addr },
    #[error("{ip} is not an address this server would give to {mac}")]
    WrongAddress { mac: String, ip: Ipv4Addr },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasePool {
    start: u32,
    end: u32,
    lease_secs: u64,
    reservations: BTreeMap<[u8; 6], Ipv4Addr>,
    /// Reverse index of `reservations`.
    reserved_ips: BTreeMap<Ipv4Addr, [u8; 6]>,
    leases: BTreeMap<[u8; 6], Lease>,
    /// Reverse index of `leases`: which MAC holds an address.
    holders: BTreeMap<Ipv4Addr, [u8; 6]>,
    declined: BTreeMap<Ipv4Addr, u64>,
}

impl LeasePool {
    pub fn new(start: Ipv4Addr, end: Ipv4Addr, lease_secs: u64) -> LeasePool {
        LeasePool {
            start: u32::from(start),
            end: u32::from(end),
            lease_secs,
            reservations: BTreeMap::new(),
            reserved_ips: BTreeMap::new(),
            leases: BTreeMap::new(),
            holders: BTreeMap::new(),
            declined: BTreeMap::new(),
        }
    }

    pub fn lease_secs(&self) -> u64 {
        self.lease_secs
    }

    /// Static reservations by MAC; a reserved address may lie outside the dynamic range.
    pub fn set_reservations(&mut self, reservations: BTreeMap<[u8; 6], Ipv4Addr>) {
        self.reserved_ips = reservations.iter().map(|(m, ip)| (*ip, *m)).collect();
        self.reservations = reservations;
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Restores leases from the store; entries with unreadable MACs are dropped.
    pub fn restore(&mut self, leases: Vec<Lease>) {
        for lease in leases {
            if let Some(mac) = kiln_spec::inventory::parse_mac(&lease.mac) {
                self.insert(mac, lease);
            }
        }
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        (self.start..=self.end).contains(&u32::from(ip))
    }

    /// Whether `ip` may be handed to `mac` at `now`.
    fn available_to(&self, mac: &[u8; 6], ip: Ipv4Addr, now: u64) -> bool {
        if self.declined.get(&ip).is_some_and(|&until| until > now) {
            return false;
        }
        if self.reserved_ips.get(&ip).is_some_and(|m| m != mac) {
            return false;
        }
        match self.holders.get(&ip) {
            Some(m) if m != mac => self.leases.get(m).is_none_or(|l| l.expires <= now),
            _ => true,
        }
    }

    /// The address this server would give `mac`: its reservation, its current lease, the
    /// address it asks for, else the lowest free one.
    pub fn choose(
        &self,
        mac: &[u8; 6],
        requested: Option<Ipv4Addr>,
        now: u64,
    ) -> Result<Ipv4Addr, PoolError> {
        if let Some(&ip) = self.reservations.get(mac) {
            return Ok(ip);
        }
        if let Some(l) = self.leases.get(mac)
            && self.available_to(mac, l.ip, now)
            && self.in_range(l.ip)
        {
            return Ok(l.ip);
        }
        if let Some(ip) = requested
            && self.in_range(ip)
            && self.available_to(mac, ip, now)
        {
            return Ok(ip);
        }
        (self.start..=self.end)
            .map(Ipv4Addr::from)
            .find(|&ip| self.available_to(mac, ip, now))
            .ok_or(PoolError::Exhausted {
                start: self.start.into(),
                end: self.end.into(),
            })
    }

    /// DHCPDISCOVER: picks an address and holds it briefly for this client.
    pub fn offer(
        &mut self,
        mac: &[u8; 6],
        requested: Option<Ipv4Addr>,
        now: u64,
    ) -> Result<Ipv4Addr, PoolError> {
        let ip = self.choose(mac, requested, now)?;
        let keep_bound = self
            .leases
            .get(mac)
            .is_some_and(|l| l.ip == ip && l.state == LeaseState::Bound && l.expires > now);
        if !keep_bound {
            self.insert(
                *mac,
                Lease {
                    mac: kiln_spec::inventory::format_mac(mac),
                    ip,
                    state: LeaseState::Offered,
                    expires: now + OFFER_HOLD_SECS,
                },
            );
        }
        Ok(ip)
    }

    /// DHCPREQUEST: binds `ip` to `mac` if this server would give it that address.
    pub fn bind(&mut self, mac: &[u8; 6], ip: Ipv4Addr, now: u64) -> Result<Lease, PoolError> {
        let acceptable = match self.reservations.get(mac) {
            Some(&reserved) => reserved == ip,
            None => self.in_range(ip) && self.available_to(mac, ip, now),
        };
        if !acceptable {
            return Err(PoolError::WrongAddress {
                mac: kiln_spec::inventory::format_mac(mac),
                ip,
            });
        }
        let lease = Lease {
            mac: kiln_spec::inventory::format_mac(mac),
            ip,
            state: LeaseState::Bound,
            expires: now + self.lease_secs,
        };
        self.insert(*mac, lease.clone());
        Ok(lease)
    }

    /// Records `lease`, replacing the MAC's previous one and any lapsed holder of its address.
    fn insert(&mut self, mac: [u8; 6], lease: Lease) {
        if let Some(old) = self.leases.get(&mac)
            && self.holders.get(&old.ip) == Some(&mac)
        {
            self.holders.remove(&old.ip);
        }
        if let Some(previous) = self.holders.insert(lease.ip, mac)
            && previous != mac
        {
            self.leases.remove(&previous);
        }
        self.leases.insert(mac, lease);
    }

    /// DHCPRELEASE: forgets the binding if it is this client's.
    pub fn release(&mut self, mac: &[u8; 6], ip: Ipv4Addr) -> bool {
        if self.leases.get(mac).is_some_and(|l| l.ip == ip) {
            self.leases.remove(mac);
            self.holders.remove(&ip);
            return true;
        }
        false
    }

    /// DHCPDECLINE: the client found `ip` in use; keep it out of the pool for a while.
    pub fn decline(&mut self, mac: &[u8; 6], ip: Ipv4Addr, now: u64) {
        self.release(mac, ip);
        self.declined.insert(ip, now + DECLINE_HOLD_SECS);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reading leases {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("leases {path} are not valid JSON: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing leases {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Leases stored in the state directory (missing file: no leases yet).
pub fn load(state_dir: &Path) -> Result<Vec<Lease>, StoreError> {
    let path = state_dir.join(LEASES_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StoreError::Read { path, source }),
    };
    serde_json::from_str(&text).map_err(|source| StoreError::Parse { path, source })
}

/// Writes the bound leases (offers are transient) to a temporary file, syncs it and renames it
/// over the old one: a crash leaves either the old or the new file, never half of one.
pub fn save(state_dir: &Path, pool: &LeasePool) -> Result<(), StoreError> {
    use std::io::Write;
    let path = state_dir.join(LEASES_FILE);
    let bound: Vec<&Lease> = pool
        .leases()
        .filter(|l| l.state == LeaseState::Bound)
        .collect();
    let text = serde_json::to_string_pretty(&bound).unwrap_or_else(|_| "[]".into());
    let tmp = state_dir.join(format!(".{LEASES_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(state_dir)?.sync_all()
    };
    write().map_err(|source| StoreError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const C: [u8; 6] = [2, 0, 0, 0, 0, 3];

    fn pool() -> LeasePool {
        LeasePool::new([10, 0, 0, 100].into(), [10, 0, 0, 101].into(), 3600)
    }

    #[test]
    fn offers_lowest_free_then_requested_then_exhausts() {
        let mut p = pool();
        assert_eq!(p.offer(&A, None, 0).unwrap(), Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(
            p.offer(&B, Some([10, 0, 0, 100].into()), 0).unwrap(),
            Ipv4Addr::new(10, 0, 0, 101),
            "a held offer is not given away"
        );
        assert_eq!(
            p.offer(&C, None, 1),
            Err(PoolError::Exhausted {
                start: [10, 0, 0, 100].into(),
                end: [10, 0, 0, 101].into()
            })
        );
        // The offer to A lapses: C gets that address.
        assert_eq!(
            p.offer(&C, None, OFFER_HOLD_SECS + 1).unwrap(),
            Ipv4Addr::new(10, 0, 0, 100)
        );
    }

    #[test]
    fn binds_keeps_and_renews_a_clients_address() {
        let mut p = pool();
        let ip = p.offer(&A, None, 0).unwrap();
        let lease = p.bind(&A, ip, 5).unwrap();
        assert_eq!(lease.expires, 3605);
        assert_eq!(p.offer(&A, None, 100).unwrap(), ip, "same address again");
        assert_eq!(p.bind(&A, ip, 200).unwrap().expires, 3800, "renewal");
        assert!(p.bind(&B, ip, 300).is_err(), "someone else's address");
        assert!(
            p.bind(&B, [10, 0, 0, 7].into(), 300).is_err(),
            "outside the range"
        );
    }

    #[test]
    fn reservations_win_and_are_kept_from_others() {
        let mut p = pool();
        p.set_reservations(
            [
                (B, Ipv4Addr::new(10, 0, 0, 100)),
                (C, Ipv4Addr::new(10, 0, 0, 50)),
            ]
            .into(),
        );
        assert_eq!(p.offer(&A, None, 0).unwrap(), Ipv4Addr::new(10, 0, 0, 101));
        assert_eq!(p.offer(&C, None, 0).unwrap(), Ipv4Addr::new(10, 0, 0, 50));
        assert!(p.bind(&C, [10, 0, 0, 50].into(), 0).is_ok());
        assert!(p.bind(&C, [10, 0, 0, 101].into(), 0).is_err());
        assert!(p.bind(&A, [10, 0, 0, 100].into(), 0).is_err());
    }

    #[test]
    fn releases_and_declines_free_or_block_addresses() {
        let mut p = pool();
        let ip = p.offer(&A, None, 0).unwrap();
        p.bind(&A, ip, 0).unwrap();
        assert!(!p.release(&B, ip));
        assert!(p.release(&A, ip));
        assert_eq!(p.offer(&B, None, 1).unwrap(), ip);
        p.decline(&B, ip, 2);
        assert_eq!(p.offer(&C, None, 3).unwrap(), Ipv4Addr::new(10, 0, 0, 101));
    }

    #[test]
    fn bound_leases_survive_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pool();
        let ip = p.offer(&A, None, 0).unwrap();
        p.bind(&A, ip, 0).unwrap();
        p.offer(&B, None, 0).unwrap();
        save(dir.path(), &p).unwrap();
        let mut q = pool();
        q.restore(load(dir.path()).unwrap());
        assert_eq!(q.leases().count(), 1);
        assert_eq!(q.offer(&A, None, 10).unwrap(), ip);
        assert_eq!(load(tempfile::tempdir().unwrap().path()).unwrap(), vec![]);
    }
}
