//! IPMI 2.0 over LAN: the [`BmcDriver`] on an RMCP+ [`session::Session`], with chassis,
//! boot-option, FRU, SEL and sensor commands on ipmi-rs's `IpmiCommand` trait.

mod crypto;
pub mod session;
pub mod wire;

use std::net::{SocketAddr, ToSocketAddrs};

use ipmi_rs::connection::{IpmiCommand, Message, NetFn, NotEnoughData};
use tokio::sync::Mutex;

pub use crypto::{CipherSuite, RakpContext, SessionKeys};
use session::{Session, SessionConfig};

use crate::{
    BmcDriver, BmcError, BmcProtocol, BmcTarget, BootDevice, BootOverride, Capabilities,
    ChassisStatus, Identity, PowerAction, PowerState, Result, SelEntry, SensorReading,
};

/// Get Chassis Status (Chassis 0x01).
#[derive(Debug)]
pub struct GetChassisStatus;

impl From<GetChassisStatus> for Message {
    fn from(_: GetChassisStatus) -> Message {
        Message::new_request(NetFn::Chassis, 0x01, Vec::new())
    }
}

impl IpmiCommand for GetChassisStatus {
    type Output = ChassisStatus;
    type Error = NotEnoughData;

    fn parse_success_response(data: &[u8]) -> Result<ChassisStatus, NotEnoughData> {
        if data.len() < 3 {
            return Err(NotEnoughData);
        }
        let (power, misc) = (data[0], data[2]);
        Ok(ChassisStatus {
            power: if power & 0x01 != 0 {
                PowerState::On
            } else {
                PowerState::Off
            },
            power_overload: power & 0x02 != 0,
            power_interlock: power & 0x04 != 0,
            power_fault: power & 0x08 != 0 || power & 0x10 != 0,
            restore_policy: match (power >> 5) & 0x03 {
                0 => "always-off",
                1 => "previous",
                2 => "always-on",
                _ => "unknown",
            }
            .to_string(),
            intrusion: misc & 0x01 != 0,
            drive_fault: misc & 0x04 != 0,
            cooling_fault: misc & 0x08 != 0,
        })
    }
}

/// Chassis Control (Chassis 0x02).
#[derive(Debug)]
pub struct ChassisControl(pub PowerAction);

impl From<ChassisControl> for Message {
    fn from(c: ChassisControl) -> Message {
        let code = match c.0 {
            PowerAction::Off => 0x00,
            PowerAction::On => 0x01,
            PowerAction::Cycle => 0x02,
            PowerAction::Reset => 0x03,
            PowerAction::SoftOff => 0x05,
        };
        Message::new_request(NetFn::Chassis, 0x02, vec![code])
    }
}

impl IpmiCommand for ChassisControl {
    type Output = ();
    type Error = NotEnoughData;

    fn parse_success_response(_: &[u8]) -> Result<(), NotEnoughData> {
        Ok(())
    }
}

/// Boot flags parameter (5) of the system boot options: byte 1 valid/persistent/EFI,
/// byte 2 the device selector (IPMI 2.0 table 28-14).
fn boot_flags(boot: &BootOverride) -> [u8; 5] {
    let device = match boot.device {
        BootDevice::None => 0x00,
        BootDevice::Pxe => 0x04,
        BootDevice::Disk => 0x08,
        BootDevice::Cdrom => 0x14,
        BootDevice::BiosSetup => 0x18,
    };
    let valid = if boot.device == BootDevice::None {
        0x00
    } else {
        0x80
    };
    let persistent = if boot.persistent { 0x40 } else { 0x00 };
    let efi = if boot.uefi { 0x20 } else { 0x00 };
    [valid | persistent | efi, device, 0, 0, 0]
}

fn parse_boot_flags(flags: &[u8]) -> Option<BootOverride> {
    if flags.len() < 2 {
        return None;
    }
    let device = match (flags[1] >> 2) & 0x0F {
        0x1 => BootDevice::Pxe,
        0x2 | 0x3 => BootDevice::Disk,
        0x5 => BootDevice::Cdrom,
        0x6 => BootDevice::BiosSetup,
        _ => BootDevice::None,
    };
    Some(BootOverride {
        device,
        persistent: flags[0] & 0x40 != 0,
        uefi: flags[0] & 0x20 != 0,
    })
}

/// Set System Boot Options (Chassis 0x08), parameter 5 (boot flags).
#[derive(Debug)]
pub struct SetBootFlags(pub BootOverride);

impl From<SetBootFlags> for Message {
    fn from(s: SetBootFlags) -> Message {
        let mut data = vec![0x05];
        data.extend_from_slice(&boot_flags(&s.0));
        Message::new_request(NetFn::Chassis, 0x08, data)
    }
}

impl IpmiCommand for SetBootFlags {
    type Output = ();
    type Error = NotEnoughData;

    fn parse_success_response(_: &[u8]) -> Result<(), NotEnoughData> {
        Ok(())
    }
}

/// Get System Boot Options (Chassis 0x09), parameter 5.
#[derive(Debug)]
pub struct GetBootFlags;

impl From<GetBootFlags> for Message {
    fn from(_: GetBootFlags) -> Message {
        Message::new_request(NetFn::Chassis, 0x09, vec![0x05, 0x00, 0x00])
    }
}

impl IpmiCommand for GetBootFlags {
    type Output = BootOverride;
    type Error = NotEnoughData;

    fn parse_success_response(data: &[u8]) -> Result<BootOverride, NotEnoughData> {
        // Parameter version, parameter selector, then the five flag bytes.
        data.get(2..)
            .and_then(parse_boot_flags)
            .ok_or(NotEnoughData)
    }
}

/// Reads the product and board areas of a FRU inventory image (IPMI Platform Management FRU
/// Information Storage Definition v1.0). `None` for fields that are absent or unreadable.
pub fn parse_fru_identity(fru: &[u8]) -> Identity {
    fn area(fru: &[u8], offset_byte: usize) -> Option<&[u8]> {
        let start = *fru.get(offset_byte)? as usize * 8;
        if start == 0 {
            return None;
        }
        let len = *fru.get(start + 1)? as usize * 8;
        fru.get(start..start + len)
    }
    // Type/length fields from `at`: returns the first `count` decoded strings.
    fn fields(area: &[u8], mut at: usize, count: usize) -> Vec<Option<String>> {
        let mut out = Vec::new();
        while out.len() < count {
            let Some(&tl) = area.get(at) else { break };
            if tl == 0xC1 {
                break;
            }
            let len = (tl & 0x3F) as usize;
            let Some(bytes) = area.get(at + 1..at + 1 + len) else {
                break;
            };
            let text = match tl >> 6 {
                // 8-bit ASCII + Latin 1, or "text" in the binary slot as BMCs often do.
                3 | 0 => String::from_utf8_lossy(bytes)
                    .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                    .to_string(),
                _ => hex::encode(bytes),
            };
            out.push((!text.is_empty()).then_some(text));
            at += 1 + len;
        }
        out.resize(count, None);
        out
    }
    let mut id = Identity::default();
    if let Some(product) = area(fru, 4) {
        // Version, length, language, then manufacturer, name, part/model, version, serial.
        let f = fields(product, 3, 5);
        id.vendor = f[0].clone();
        id.model = f[1].clone().or_else(|| f[2].clone());
        id.serial = f[4].clone();
    }
    if let Some(board) = area(fru, 3) {
        // Version, length, language, 3-byte date, then manufacturer, name, serial, part.
        let f = fields(board, 6, 4);
        id.vendor = id.vendor.or_else(|| f[0].clone());
        id.model = id.model.or_else(|| f[1].clone());
        id.serial = id.serial.or_else(|| f[2].clone());
    }
    id
}

/// The IPMI driver. One session per driver, opened on first use and reused; calls are
/// serialized (a BMC handles one request per session at a time).
#[derive(Debug)]
pub struct IpmiDriver {
    target: BmcTarget,
    session: Mutex<Option<Session>>,
}

impl IpmiDriver {
    pub fn new(target: BmcTarget) -> IpmiDriver {
        IpmiDriver {
            target,
            session: Mutex::new(None),
        }
    }

    fn config(&self, suite: CipherSuite) -> Result<SessionConfig> {
        let addr: SocketAddr = (self.target.host.as_str(), self.target.port)
            .to_socket_addrs()
            .map_err(|e| BmcError::Unreachable {
                target: self.target.label(),
                reason: format!("resolving the address: {e}"),
            })?
            .next()
            .ok_or_else(|| BmcError::Unreachable {
                target: self.target.label(),
                reason: "the name resolves to no address".into(),
            })?;
        Ok(SessionConfig {
            addr,
            label: self.target.label(),
            username: self.target.username.clone(),
            password: self.target.password.clone(),
            suite,
            timeout: self.target.timeout,
            retries: self.target.retries,
        })
    }

    /// Runs `f` on the open session, opening it first if needed. A transport failure drops the
    /// session so that the next call starts a fresh one.
    async fn with_session<T>(&self, f: impl AsyncFnOnce(&mut Session) -> Result<T>) -> Result<T> {
        let mut guard = self.session.lock().await;
        if guard.is_none() {
            *guard = Some(Session::open(self.config(self.target.cipher_suite)?).await?);
        }
        let session = guard.as_mut().expect("opened above");
        let result = f(session).await;
        if matches!(
            result,
            Err(BmcError::Timeout { .. } | BmcError::Unreachable { .. } | BmcError::Protocol(_))
        ) {
            *guard = None;
        }
        result
    }

    /// Reads one SDR repository record in pieces (many BMCs, ipmi_sim among them, refuse to
    /// return a whole record at once); returns the next record ID and the record bytes.
    async fn read_sdr(session: &mut Session, id: u16) -> Result<(u16, Vec<u8>)> {
        let reservation = session
            .raw("reserve SDR repository", 0x0A, 0x22, &[])
            .await?;
        let [r0, r1] = [
            reservation.first().copied().unwrap_or(0),
            reservation.get(1).copied().unwrap_or(0),
        ];
        let [i0, i1] = id.to_le_bytes();
        let mut record = Vec::new();
        let mut next = 0xFFFF;
        let mut total = 5;
        while record.len() < total {
            let count = (total - record.len()).min(16) as u8;
            let reply = session
                .raw(
                    "get SDR",
                    0x0A,
                    0x23,
                    &[r0, r1, i0, i1, record.len() as u8, count],
                )
                .await?;
            if reply.len() < 3 {
                return Err(BmcError::Protocol(format!("SDR {id:#06x}: short reply")));
            }
            next = u16::from_le_bytes([reply[0], reply[1]]);
            record.extend_from_slice(&reply[2..]);
            if record.len() >= 5 {
                total = 5 + record[4] as usize;
            }
        }
        record.truncate(total);
        Ok((next, record))
    }

    async fn read_fru(session: &mut Session) -> Result<Vec<u8>> {
        let info = session
            .raw("get FRU inventory area info", 0x0A, 0x10, &[0])
            .await?;
        if info.len() < 2 {
            return Err(BmcError::Protocol("FRU area info is too short".into()));
        }
        let size = u16::from_le_bytes([info[0], info[1]]) as usize;
        let mut fru = Vec::with_capacity(size);
        while fru.len() < size {
            let off = fru.len() as u16;
            let count = (size - fru.len()).min(32) as u8;
            let [lo, hi] = off.to_le_bytes();
            let chunk = session
                .raw("read FRU data", 0x0A, 0x11, &[0, lo, hi, count])
                .await?;
            let got = chunk.first().copied().unwrap_or(0) as usize;
            let Some(data) = chunk.get(1..1 + got).filter(|_| got > 0) else {
                return Err(BmcError::Protocol("read FRU data returned nothing".into()));
            };
            fru.extend_from_slice(data);
        }
        Ok(fru)
    }
}

#[async_trait::async_trait]
impl BmcDriver for IpmiDriver {
    fn protocol(&self) -> BmcProtocol {
        BmcProtocol::Ipmi
    }

    async fn power_status(&self) -> Result<PowerState> {
        Ok(self.chassis_status().await?.power)
    }

    async fn power(&self, action: PowerAction) -> Result<()> {
        self.with_session(async |s| s.execute(ChassisControl(action)).await)
            .await
    }

    async fn boot_override(&self) -> Result<BootOverride> {
        self.with_session(async |s| s.execute(GetBootFlags).await)
            .await
    }

    async fn set_boot_override(&self, boot: BootOverride) -> Result<()> {
        self.with_session(async |s| s.execute(SetBootFlags(boot)).await)
            .await
    }

    async fn chassis_status(&self) -> Result<ChassisStatus> {
        self.with_session(async |s| s.execute(GetChassisStatus).await)
            .await
    }

    async fn identity(&self) -> Result<Identity> {
        self.with_session(async |s| {
            let device = s.execute(ipmi_rs::app::GetDeviceId).await?;
            let firmware = Some(format!(
                "{}.{:02}",
                device.major_fw_revision, device.minor_fw_revision
            ));
            let mut id = match Self::read_fru(s).await {
                Ok(fru) => parse_fru_identity(&fru),
                // No FRU device 0 (0xCB/0xCC): fall back to the device ID.
                Err(BmcError::BmcError { .. }) => Identity::default(),
                Err(e) => return Err(e),
            };
            id.vendor = id
                .vendor
                .or_else(|| Some(format!("IANA {}", device.manufacturer_id)));
            id.model = id
                .model
                .or_else(|| Some(format!("product {:#06x}", device.product_id)));
            id.firmware = firmware;
            Ok(id)
        })
        .await
    }

    async fn sel(&self) -> Result<Vec<SelEntry>> {
        self.with_session(async |s| {
            let mut entries = Vec::new();
            let mut next: u16 = 0x0000;
            while next != 0xFFFF {
                let [lo, hi] = next.to_le_bytes();
                let data = match s
                    .raw("get SEL entry", 0x0A, 0x43, &[0, 0, lo, hi, 0, 0xFF])
                    .await
                {
                    // An empty SEL answers "requested record not present".
                    Err(BmcError::BmcError { code: 0xCB, .. }) if entries.is_empty() => break,
                    r => r?,
                };
                if data.len() < 18 {
                    return Err(BmcError::Protocol("SEL entry is too short".into()));
                }
                let following = u16::from_le_bytes([data[0], data[1]]);
                let record = &data[2..];
                let id = u16::from_le_bytes([record[0], record[1]]);
                let timestamp = (record[2] < 0xE0)
                    .then(|| u32::from_le_bytes([record[3], record[4], record[5], record[6]]));
                let message = match ipmi_rs::storage::sel::Entry::parse(record) {
                    Ok(entry) => describe_sel(&entry),
                    Err(e) => format!("unparsed record {}: {e:?}", hex::encode(record)),
                };
                entries.push(SelEntry {
                    id,
                    timestamp,
                    message,
                });
                if following == next {
                    break;
                }
                next = following;
            }
            Ok(entries)
        })
        .await
    }

    async fn clear_sel(&self) -> Result<()> {
        self.with_session(async |s| {
            let reservation = s.execute(ipmi_rs::storage::sel::ReserveSel).await?;
            s.execute(ipmi_rs::storage::sel::ClearSel::initiate(Some(reservation)))
                .await
                .map(drop)
        })
        .await
    }

    async fn sensors(&self) -> Result<Vec<SensorReading>> {
        self.with_session(async |s| {
            let mut out = Vec::new();
            let mut next = 0x0000;
            while next != 0xFFFF {
                let (following, bytes) = match Self::read_sdr(s, next).await {
                    Err(BmcError::BmcError { code: 0xCB, .. }) if out.is_empty() => break,
                    r => r?,
                };
                // Only full sensor records (type 01h) carry analog readings.
                if let Some(sensor) = parse_full_sensor_record(&bytes) {
                    let reading = s
                        .raw("get sensor reading", 0x04, 0x2D, &[sensor.number])
                        .await?;
                    out.push(sensor.reading(&reading));
                }
                if following == next {
                    break;
                }
                next = following;
            }
            Ok(out)
        })
        .await
    }

    async fn insert_media(&self, _image_url: &str) -> Result<()> {
        Err(BmcError::Unsupported(
            "virtual media over IPMI (use Redfish)".into(),
        ))
    }

    async fn eject_media(&self) -> Result<()> {
        Err(BmcError::Unsupported(
            "virtual media over IPMI (use Redfish)".into(),
        ))
    }

    async fn probe(&self) -> Result<Capabilities> {
        let mut caps = Capabilities {
            protocol: "ipmi".into(),
            ..Capabilities::default()
        };
        let status = self.chassis_status().await?;
        caps.authenticated = true;
        caps.power = Some(status.power);
        caps.boot_override = self.boot_override().await.is_ok();
        caps.cipher_suites.push(self.target.cipher_suite.id());
        // The other suite, tried with its own short-lived session.
        for suite in [CipherSuite::Suite3, CipherSuite::Suite17] {
            if suite == self.target.cipher_suite {
                continue;
            }
            match Session::open(self.config(suite)?).await {
                Ok(s) => {
                    caps.cipher_suites.push(suite.id());
                    let _ = s.close().await;
                }
                Err(e) => caps.notes.push(format!("cipher suite {}: {e}", suite.id())),
            }
        }
        caps.cipher_suites.sort_unstable();
        caps.notes
            .push("virtual media: not available over IPMI".into());
        Ok(caps)
    }

    async fn close(&self) -> Result<()> {
        match self.session.lock().await.take() {
            Some(s) => s.close().await,
            None => Ok(()),
        }
    }
}

/// The fields of a full sensor record (SDR type 01h, IPMI 2.0 §43.1) that turn a raw reading
/// into a value. Parsed here because ipmi-rs's SDR parsers panic on short records.
#[derive(Debug, Clone, PartialEq)]
pub struct FullSensor {
    pub number: u8,
    pub name: String,
    /// 0 unsigned, 1 one's complement, 2 two's complement; `None`: not an analog reading.
    format: Option<u8>,
    linear: bool,
    m: i16,
    b: i16,
    b_exp: i8,
    r_exp: i8,
    unit: &'static str,
}

/// Sign-extends the low `bits` bits of `v`.
fn signed(v: i16, bits: u32) -> i16 {
    let shift = 16 - bits;
    (v << shift) >> shift
}

pub fn parse_full_sensor_record(r: &[u8]) -> Option<FullSensor> {
    if r.len() < 48 || r[3] != 0x01 {
        return None;
    }
    let id_len = (r[47] & 0x1F) as usize;
    let name = r.get(48..48 + id_len).unwrap_or(&r[48..]);
    let units = r[20];
    Some(FullSensor {
        number: r[7],
        name: String::from_utf8_lossy(name)
            .trim_end_matches('\0')
            .to_string(),
        format: (units >> 6 != 3).then_some(units >> 6),
        linear: r[23] & 0x7F == 0,
        m: signed(r[24] as i16 | ((r[25] as i16 & 0xC0) << 2), 10),
        b: signed(r[26] as i16 | ((r[27] as i16 & 0xC0) << 2), 10),
        r_exp: signed((r[29] >> 4) as i16, 4) as i8,
        b_exp: signed((r[29] & 0x0F) as i16, 4) as i8,
        unit: match r[21] {
            1 => "degrees C",
            2 => "degrees F",
            3 => "degrees K",
            4 => "Volts",
            5 => "Amps",
            6 => "Watts",
            18 => "RPM",
            19 => "Hz",
            _ => "",
        },
    })
}

impl FullSensor {
    /// y = (M·x + B·10^Bexp) · 10^Rexp (IPMI 2.0 §36.3) for the Get Sensor Reading answer.
    pub fn reading(&self, answer: &[u8]) -> SensorReading {
        // Byte 2 bit 5: reading unavailable; bit 6 clear: scanning disabled.
        let available = answer.len() >= 2 && answer[1] & 0x20 == 0 && answer[1] & 0x40 != 0;
        let value = match (available, self.format) {
            (true, Some(format)) if self.linear => {
                let raw = answer[0];
                let x = match format {
                    0 => raw as f64,
                    1 => {
                        let v = raw as i8;
                        if v < 0 { (v as f64) + 1.0 } else { v as f64 }
                    }
                    _ => raw as i8 as f64,
                };
                let b = self.b as f64 * 10f64.powi(self.b_exp as i32);
                Some((self.m as f64 * x + b) * 10f64.powi(self.r_exp as i32))
            }
            _ => None,
        };
        let display = match value {
            Some(v) => format!("{v} {}", self.unit).trim_end().to_string(),
            None if !available => "unavailable".into(),
            None => format!("{:#04x}", answer.first().copied().unwrap_or(0)),
        };
        SensorReading {
            name: self.name.clone(),
            value,
            unit: self.unit.to_string(),
            display,
        }
    }
}

fn describe_sel(entry: &ipmi_rs::storage::sel::Entry) -> String {
    struct Desc<'a>(&'a ipmi_rs::storage::sel::Entry);
    impl std::fmt::Display for Desc<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.0.event_description(f)
        }
    }
    match entry {
        ipmi_rs::storage::sel::Entry::System {
            sensor_type,
            sensor_number,
            event_direction,
            ..
        } => {
            let what = Desc(entry).to_string();
            let dir = match event_direction {
                ipmi_rs::storage::sel::EventDirection::Assert => "asserted",
                ipmi_rs::storage::sel::EventDirection::Deassert => "deasserted",
            };
            let sensor = ipmi_rs::storage::sdr::SensorType::from(*sensor_type);
            format!("{sensor:?} #{sensor_number:#04x}: {what} {dir}")
                .replace("  ", " ")
                .trim()
                .to_string()
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_flags_round_trip_for_every_device() {
        for device in [
            BootDevice::Pxe,
            BootDevice::Disk,
            BootDevice::Cdrom,
            BootDevice::BiosSetup,
        ] {
            for persistent in [false, true] {
                for uefi in [false, true] {
                    let b = BootOverride {
                        device,
                        persistent,
                        uefi,
                    };
                    assert_eq!(parse_boot_flags(&boot_flags(&b)), Some(b));
                }
            }
        }
        // IPMI 2.0 table 28-14: valid, next boot only, EFI, force PXE.
        assert_eq!(
            boot_flags(&BootOverride {
                device: BootDevice::Pxe,
                persistent: false,
                uefi: true
            }),
            [0xA0, 0x04, 0, 0, 0]
        );
    }

    proptest::proptest! {
        // The BMC's SEL bytes go through ipmi-rs's parser.
        #[test]
        fn record_parsers_never_panic(data: Vec<u8>) {
            let _ = ipmi_rs::storage::sel::Entry::parse(&data);
            let _ = GetBootFlags::parse_success_response(&data);
            let _ = GetChassisStatus::parse_success_response(&data);
        }

        #[test]
        fn full_sensor_records_never_panic(body: Vec<u8>, answer: Vec<u8>) {
            let mut record = vec![0x01, 0x00, 0x51, 0x01, body.len().min(255) as u8];
            record.extend_from_slice(&body);
            if let Some(sensor) = parse_full_sensor_record(&record) {
                let _ = sensor.reading(&answer);
            }
        }
    }

    #[test]
    fn sensor_readings_apply_the_record_conversion() {
        // Full sensor record: sensor 7, volts, M = 5, B = -2, Rexp = -2, Bexp = 1.
        let mut r = vec![0u8; 48];
        r[3] = 0x01;
        r[7] = 7;
        r[21] = 4;
        r[24] = 5;
        r[26] = 0xFE;
        r[27] = 0xC0;
        r[29] = 0xE1;
        r[47] = 0xC0 | 4;
        r.extend_from_slice(b"Vcpu");
        let s = parse_full_sensor_record(&r).unwrap();
        assert_eq!((s.number, s.name.as_str()), (7, "Vcpu"));
        // (5·240 + (-2)·10) · 10⁻² = 11.8
        let got = s.reading(&[240, 0x40]);
        assert!((got.value.unwrap() - 11.8).abs() < 1e-9, "{got:?}");
        assert_eq!(got.unit, "Volts");
        assert_eq!(s.reading(&[240, 0x60]).display, "unavailable");
        assert_eq!(parse_full_sensor_record(&r[..47]), None);
    }

    #[test]
    fn chassis_status_bits() {
        let s = GetChassisStatus::parse_success_response(&[0x41, 0x00, 0x08, 0x00]).unwrap();
        assert_eq!(s.power, PowerState::On);
        assert_eq!(s.restore_policy, "always-on");
        assert!(s.cooling_fault && !s.drive_fault);
        assert!(GetChassisStatus::parse_success_response(&[0x01]).is_err());
    }

    #[test]
    fn fru_identity_reads_product_and_board_areas() {
        // Common header (product area at 8·1), then a product info area laid out by hand:
        // version, length in 8-byte units, language, then type/length-prefixed ASCII fields.
        let mut fru = vec![0x01, 0, 0, 0, 0x01, 0, 0, 0];
        let mut product = vec![0x01, 0x00, 0x00];
        for field in ["Kiln Labs", "KX-1", "P-7", "1.0", "SN-0042"] {
            product.push(0xC0 | field.len() as u8);
            product.extend_from_slice(field.as_bytes());
        }
        product.push(0xC1);
        product.resize(product.len().div_ceil(8) * 8, 0);
        product[1] = (product.len() / 8) as u8;
        fru.extend_from_slice(&product);
        let id = parse_fru_identity(&fru);
        assert_eq!(id.vendor.as_deref(), Some("Kiln Labs"));
        assert_eq!(id.model.as_deref(), Some("KX-1"));
        assert_eq!(id.serial.as_deref(), Some("SN-0042"));
        for n in 0..fru.len() {
            parse_fru_identity(&fru[..n]);
        }
    }
}
