//! Stage-1 init: `kiln-init` (this module and nothing of the CLI) runs as PID 1 of kiln's
//! initramfs.
//!
//! It mounts the kernel filesystems, loads the kernel modules shipped in the initramfs (in
//! dependency waves, from its `modules.dep` and `modules.softdep`), finds the root image named
//! by the kernel command line, stacks a writable overlay on it and hands over to systemd with
//! `switch_root`.
//!
//! Root sources, chosen by [`root_source`]:
//! - `kiln.root=live:LABEL`: the ISO9660 medium with that volume label (CD or USB stick),
//!   which carries `/live/rootfs.squashfs`; writes go to a tmpfs.
//! - `kiln.root=http://HOST/…/rootfs.squashfs` with `kiln.root.sha256=HEX`: fetched over HTTP
//!   into a tmpfs after a DHCP lease on the first NIC that gets one and verified against the
//!   digest (the build manifest's, put there by whoever wrote the boot script); writes go to a
//!   tmpfs. Without a digest, or on a mismatch, nothing is mounted.
//! - `kiln.slot=A|B` with `kiln.disk=GUID`: an installed disk; the squashfs slot is the GPT
//!   partition named `KILN_A`/`KILN_B`, writes go to the ext4 partition named `KILN_STATE`,
//!   both on the disk whose GPT disk GUID is GUID and on no other.
//!
//! An unattended install (`kiln.install=auto`) boots systemd into [`INSTALL_TARGET`]: the
//! installer and what it reads, not the whole live system, unless the command line names its
//! own `systemd.unit=`.
//!
//! Everything that decides is a pure function with unit tests; [`run`] only does the IO.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_spec::kmod::{ModulesDep, ModulesDepError, module_name};
use kiln_spec::{bootargs, layout};
use thiserror::Error;

mod net;

/// Where the live medium's root image lives on the ISO.
pub const ISO_ROOTFS_PATH: &str = "live/rootfs.squashfs";
/// Where stage-1 finds its kernel modules inside the initramfs (`/lib/modules/<release>`).
pub const MODULES_DIR: &str = "/lib/modules";
/// GPT partition name of the writable state partition on an installed disk.
pub const STATE_PARTNAME: &str = "KILN_STATE";
/// The systemd target an unattended install boots: the installer, the journal, udev and the
/// local file systems. The live system's other services (network, logins) start only when the
/// install needs the network, stays in the live system or fails.
pub const INSTALL_TARGET: &str = "kiln-install.target";

/// Why stage-1 cannot continue. Every variant says what it needed and what it found.
#[derive(Debug, Error)]
pub enum Stage1Error {
    #[error(
        "no root given on the kernel command line (need kiln.root=live:LABEL, kiln.root=http://…, or kiln.slot=A|B)"
    )]
    NoRoot,
    #[error("kiln.root={0:?} is not understood (need live:LABEL or an http:// URL)")]
    BadRoot(String),
    #[error("kiln.slot={0:?} is not understood (need A or B)")]
    BadSlot(String),
    #[error(transparent)]
    Modules(#[from] ModulesDepError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("gave up after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("fetching the root image: {0}")]
    Fetch(String),
    #[error(
        "kiln.root={0} has no kiln.root.sha256=HEX beside it; refusing to boot an unverified image"
    )]
    NoDigest(String),
    #[error("{url}: sha256 is {actual}, the build manifest says {expected}; nothing was mounted")]
    Digest {
        url: String,
        expected: String,
        actual: String,
    },
    #[error(
        "kiln.slot is given without kiln.disk=GUID naming the installed disk; refusing to guess \
         among the machine's disks"
    )]
    NoDisk,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Stage1Error {
    let what = what.into();
    move |source| Stage1Error::Io { what, source }
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> Stage1Error {
    let what = what.into();
    move |source| Stage1Error::Sys { what, source }
}

/// The kernel command line, split the way the kernel does (double quotes group words).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cmdline {
    params: Vec<(String, Option<String>)>,
}

impl Cmdline {
    pub fn parse(line: &str) -> Self {
        let mut params = Vec::new();
        let mut word = String::new();
        let mut in_quotes = false;
        let mut has_word = false;
        for c in line.chars() {
            match c {
                '"' => {
                    in_quotes = !in_quotes;
                    has_word = true;
                }
                c if c.is_whitespace() && !in_quotes => {
                    if has_word {
                        params.push(split_param(&word));
                        word.clear();
                        has_word = false;
                    }
                }
                c => {
                    word.push(c);
                    has_word = true;
                }
            }
        }
        if has_word {
            params.push(split_param(&word));
        }
        Self { params }
    }

    /// The value of the last `key=value` for `key` (the kernel's rule: later wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    pub fn has_flag(&self, key: &str) -> bool {
        self.params.iter().any(|(k, _)| k == key)
    }

    /// `true` when the command line asks for an unattended install (`kiln.install=auto`).
    pub fn unattended_install(&self) -> bool {
        self.get(kiln_spec::enrol::INSTALL_ARG) == Some("auto")
    }
}

fn split_param(word: &str) -> (String, Option<String>) {
    match word.split_once('=') {
        Some((k, v)) => (k.to_string(), Some(v.to_string())),
        None => (word.to_string(), None),
    }
}

/// An installed system's root slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// The GPT partition name carrying this slot's squashfs.
    pub fn partname(self) -> &'static str {
        match self {
            Slot::A => "KILN_A",
            Slot::B => "KILN_B",
        }
    }
}

/// Where the root image comes from and where its writes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// ISO9660 medium found by volume label; tmpfs overlay.
    Live { label: String },
    /// squashfs fetched over HTTP into tmpfs and checked against `sha256`; tmpfs overlay.
    Http { url: String, sha256: String },
    /// Installed slot partition; overlay on `KILN_STATE`; both on the disk with GPT disk
    /// GUID `disk`.
    Installed { slot: Slot, disk: uuid::Uuid },
}

/// Decides the root source from the command line. `kiln.root` wins over `kiln.slot`, so a live
/// medium can always boot a machine that also has an installed disk.
pub fn root_source(cmdline: &Cmdline) -> Result<RootSource, Stage1Error> {
    if let Some(root) = cmdline.get("kiln.root") {
        if let Some(label) = root.strip_prefix("live:")
            && !label.is_empty()
        {
            return Ok(RootSource::Live {
                label: label.to_string(),
            });
        }
        if root.starts_with("http://") && root.len() > "http://".len() {
            let sha256 = cmdline
                .get(bootargs::ROOT_SHA256)
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| Stage1Error::NoDigest(root.to_string()))?;
            return Ok(RootSource::Http {
                url: root.to_string(),
                sha256: sha256.to_string(),
            });
        }
        return Err(Stage1Error::BadRoot(root.to_string()));
    }
    let slot = match cmdline.get(layout::SLOT_KERNEL_ARG) {
        Some("A" | "a") => Slot::A,
        Some("B" | "b") => Slot::B,
        Some(other) => return Err(Stage1Error::BadSlot(other.to_string())),
        None => return Err(Stage1Error::NoRoot),
    };
    let disk = cmdline
        .get(layout::DISK_KERNEL_ARG)
        .and_then(|g| g.parse().ok())
        .ok_or(Stage1Error::NoDisk)?;
    Ok(RootSource::Installed { slot, disk })
}

/// The disk GUID in a GPT header (the sector at LBA 1), if `header` is one.
pub fn gpt_disk_guid(header: &[u8]) -> Option<uuid::Uuid> {
    if header.get(..8)? != b"EFI PART" {
        return None;
    }
    let bytes: [u8; 16] = header.get(56..72)?.try_into().ok()?;
    Some(uuid::Uuid::from_bytes_le(bytes))
}

/// The volume identifier of an ISO9660 primary volume descriptor (the 2048 bytes at 32 KiB).
pub fn iso9660_volume_id(descriptor: &[u8]) -> Option<String> {
    if descriptor.len() < 72 || descriptor[0] != 1 || &descriptor[1..6] != b"CD001" {
        return None;
    }
    let id = String::from_utf8_lossy(&descriptor[40..72]);
    Some(id.trim_end_matches([' ', '\0']).to_string())
}

/// `DEVNAME` and `PARTNAME` of a `/sys/class/block/*/uevent` file.
pub fn uevent_names(uevent: &str) -> (Option<&str>, Option<&str>) {
    let mut devname = None;
    let mut partname = None;
    for line in uevent.lines() {
        if let Some(v) = line.strip_prefix("DEVNAME=") {
            devname = Some(v);
        } else if let Some(v) = line.strip_prefix("PARTNAME=") {
            partname = Some(v);
        }
    }
    (devname, partname)
}

/// Entry point when the binary runs as PID 1 of the initramfs. Never returns: it either
/// executes the real init or stops with an emergency message (PID 1 must not exit).
pub fn run() -> ! {
    let err = match boot() {
        Ok(never) => match never {},
        Err(e) => e,
    };
    emergency(&err)
}

fn say(msg: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "kiln-stage1: {msg}");
    let _ = out.flush();
}

/// How long an installed slot that cannot boot shows its error before rebooting.
const FAILED_SLOT_REBOOT: Duration = Duration::from_secs(30);

fn emergency(err: &Stage1Error) -> ! {
    say(&format!("error: {err}"));
    let installed = fs::read_to_string("/proc/cmdline")
        .is_ok_and(|c| Cmdline::parse(&c).get(layout::SLOT_KERNEL_ARG).is_some());
    if installed {
        // The boot loader counts this as a failed try of the slot; after the last one it
        // boots the last good slot. Waiting here forever would need someone at the console.
        say(&format!(
            "emergency: this slot cannot boot; rebooting in {} s so the boot loader can fall back.",
            FAILED_SLOT_REBOOT.as_secs()
        ));
        std::thread::sleep(FAILED_SLOT_REBOOT);
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    }
    say("emergency: the root file system could not be mounted; nothing more will happen.");
    say(
        "check the kernel command line (kiln.root=… or kiln.slot=…) and the boot medium, then power-cycle.",
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// How long to wait for a boot medium before giving up (slow emulated USB can take a while).
const DEVICE_TIMEOUT: Duration = Duration::from_secs(90);

enum Never {}

fn boot() -> Result<Never, Stage1Error> {
    mount_kernel_filesystems()?;
    reopen_console();
    say("started");
    let cmdline = Cmdline::parse(
        &fs::read_to_string("/proc/cmdline").map_err(io_err("reading /proc/cmdline"))?,
    );
    let source = root_source(&cmdline)?;
    load_modules()?;
    let rw = prepare_root(&source)?;
    switch_root(rw, &init_argv(&cmdline))
}

/// The real init's argument vector.
fn init_argv(cmdline: &Cmdline) -> Vec<String> {
    let mut argv = vec!["/sbin/init".to_string()];
    if cmdline.unattended_install() && cmdline.get("systemd.unit").is_none() {
        argv.push(format!("--unit={INSTALL_TARGET}"));
    }
    argv
}

fn mount_kernel_filesystems() -> Result<(), Stage1Error> {
    use nix::mount::{MsFlags, mount};
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    for (src, dir, fstype, flags, data) in [
        ("proc", "/proc", "proc", nodev, None),
        ("sysfs", "/sys", "sysfs", nodev, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ] {
        fs::create_dir_all(dir).map_err(io_err(format!("creating {dir}")))?;
        mount(Some(src), dir, Some(fstype), flags, data)
            .map_err(sys_err(format!("mounting {fstype} on {dir}")))?;
    }
    Ok(())
}

/// The kernel opened /dev/console from the initramfs; open it again from devtmpfs in case the
/// archive had no console node, so messages reach the screen and the serial port.
fn reopen_console() {
    if let Ok(console) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        let _ = nix::unistd::dup2_stdin(&console);
        let _ = nix::unistd::dup2_stdout(&console);
        let _ = nix::unistd::dup2_stderr(&console);
    }
}

fn load_modules() -> Result<(), Stage1Error> {
    let release = nix::sys::utsname::uname()
        .map_err(sys_err("uname"))?
        .release()
        .to_string_lossy()
        .into_owned();
    let dir = Path::new(MODULES_DIR).join(&release);
    let read = |name: &str| {
        let path = dir.join(name);
        match fs::read_to_string(&path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
        }
    };
    // Without a modules.dep everything the boot needs is built into this kernel.
    let Some(text) = read("modules.dep")? else {
        return Ok(());
    };
    let deps =
        ModulesDep::parse(&text)?.with_softdeps(&read("modules.softdep")?.unwrap_or_default());
    let names: Vec<String> = deps.names().map(str::to_string).collect();
    let mut loaded = 0;
    // Each module takes tens of milliseconds to load under emulation: the modules of one wave
    // need nothing of each other and load side by side.
    for wave in deps.load_waves(names.iter().map(String::as_str))? {
        loaded += std::thread::scope(|s| {
            let loads: Vec<_> = wave
                .iter()
                .map(|rel| {
                    let path = dir.join(rel);
                    s.spawn(move || load_module(&path))
                })
                .collect();
            loads
                .into_iter()
                .map(|l| l.join().expect("a module load panicked"))
                .try_fold(0, |n, l| l.map(|done| n + usize::from(done)))
        })?;
    }
    say(&format!("loaded {loaded} kernel modules"));
    Ok(())
}

/// Loads one module file: whether the kernel took it now (not already there, not for absent
/// hardware).
fn load_module(path: &Path) -> Result<bool, Stage1Error> {
    let file = fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) => Ok(true),
        // Already there (loaded as another module's dependency by the kernel itself).
        Err(nix::errno::Errno::EEXIST) => Ok(false),
        // No matching hardware is not an error for a driver.
        Err(nix::errno::Errno::ENODEV) => Ok(false),
        Err(e) => {
            say(&format!(
                "warning: loading {}: {e}",
                module_name(&path.to_string_lossy())
            ));
            Ok(false)
        }
    }
}

/// The mount point of the read-only root image and the directory for the overlay's writes.
struct Prepared {
    upper_base: PathBuf,
}

const RO: &str = "/run/kiln/ro";
const RW: &str = kiln_spec::layout::STATE_MOUNT;
const MEDIUM: &str = "/run/kiln/medium";
const NEWROOT: &str = "/newroot";

fn prepare_root(source: &RootSource) -> Result<Prepared, Stage1Error> {
    for dir in [RO, RW, MEDIUM, NEWROOT] {
        fs::create_dir_all(dir).map_err(io_err(format!("creating {dir}")))?;
    }
    match source {
        RootSource::Live { label } => {
            say(&format!("looking for the live medium labelled {label}"));
            let dev = wait_for(&format!("a medium labelled {label}"), || {
                find_iso_by_label(label)
            })?;
            say(&format!("found live medium on {}", dev.display()));
            mount_ro(&dev, MEDIUM, "iso9660")?;
            let image = Path::new(MEDIUM).join(ISO_ROOTFS_PATH);
            let loopdev = loop_attach(&image)?;
            mount_ro(&loopdev, RO, "squashfs")?;
            mount_tmpfs(RW)?;
        }
        RootSource::Http { url, sha256 } => {
            mount_tmpfs(RW)?;
            let image = Path::new(RW).join("rootfs.squashfs");
            net::fetch_root(url, sha256, &image)?;
            let loopdev = loop_attach(&image)?;
            mount_ro(&loopdev, RO, "squashfs")?;
        }
        RootSource::Installed { slot, disk } => {
            let name = slot.partname();
            say(&format!(
                "looking for partition {name} on the disk with GPT GUID {disk}"
            ));
            let dev = wait_for(&format!("partition {name} on disk {disk}"), || {
                find_partition(disk, name)
            })?;
            say(&format!("found {name} on {}", dev.display()));
            mount_ro(&dev, RO, "squashfs")?;
            let state = wait_for(
                &format!("partition {STATE_PARTNAME} on disk {disk}"),
                || find_partition(disk, STATE_PARTNAME),
            )?;
            nix::mount::mount(
                Some(&state),
                RW,
                Some("ext4"),
                nix::mount::MsFlags::MS_NOATIME,
                None::<&str>,
            )
            .map_err(sys_err(format!("mounting {} on {RW}", state.display())))?;
        }
    }
    let upper_base = Path::new(RW).join("root");
    Ok(Prepared { upper_base })
}

fn wait_for(
    what: &str,
    mut probe: impl FnMut() -> Option<PathBuf>,
) -> Result<PathBuf, Stage1Error> {
    let start = Instant::now();
    loop {
        if let Some(found) = probe() {
            return Ok(found);
        }
        if start.elapsed() > DEVICE_TIMEOUT {
            return Err(Stage1Error::Timeout {
                what: what.to_string(),
                secs: DEVICE_TIMEOUT.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Block devices as (device node, partition name), whole disks before partitions.
fn block_devices() -> Vec<(PathBuf, Option<String>)> {
    let Ok(entries) = fs::read_dir("/sys/class/block") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let sys = entry.path();
        let Ok(uevent) = fs::read_to_string(sys.join("uevent")) else {
            continue;
        };
        let (Some(devname), partname) = uevent_names(&uevent) else {
            continue;
        };
        let is_part = sys.join("partition").exists();
        found.push((
            is_part,
            PathBuf::from("/dev").join(devname),
            partname.map(str::to_string),
        ));
    }
    found.sort();
    found
        .into_iter()
        .map(|(_, dev, name)| (dev, name))
        .collect()
}

fn find_iso_by_label(label: &str) -> Option<PathBuf> {
    block_devices().into_iter().find_map(|(dev, _)| {
        let mut f = fs::File::open(&dev).ok()?;
        f.seek(SeekFrom::Start(32 * 1024)).ok()?;
        let mut pvd = [0u8; 2048];
        f.read_exact(&mut pvd).ok()?;
        (iso9660_volume_id(&pvd)? == label).then_some(dev)
    })
}

/// The partition named `name` on the whole disk whose GPT disk GUID is `disk`.
pub fn find_partition(disk: &uuid::Uuid, name: &str) -> Option<PathBuf> {
    let whole = block_devices().into_iter().find_map(|(dev, part)| {
        if part.is_some() {
            return None;
        }
        let f = fs::File::open(&dev).ok()?;
        // LBA 1 on 512- and 4096-byte sector disks.
        [512u64, 4096].iter().find_map(|&lba1| {
            use std::os::unix::fs::FileExt;
            let mut header = [0u8; 92];
            f.read_exact_at(&mut header, lba1).ok()?;
            (gpt_disk_guid(&header)? == *disk).then(|| dev.clone())
        })
    })?;
    let disk_name = whole.file_name()?.to_string_lossy().into_owned();
    // Partitions of a disk are the sysfs children of its directory.
    let sys = Path::new("/sys/class/block").join(&disk_name);
    fs::read_dir(&sys).ok()?.flatten().find_map(|e| {
        let uevent = fs::read_to_string(e.path().join("uevent")).ok()?;
        match uevent_names(&uevent) {
            (Some(dev), Some(part)) if part == name => Some(PathBuf::from("/dev").join(dev)),
            _ => None,
        }
    })
}

fn mount_ro(dev: &Path, dir: &str, fstype: &str) -> Result<(), Stage1Error> {
    nix::mount::mount(
        Some(dev),
        dir,
        Some(fstype),
        nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(sys_err(format!(
        "mounting {} ({fstype}) on {dir}",
        dev.display()
    )))
}

fn mount_tmpfs(dir: &str) -> Result<(), Stage1Error> {
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(sys_err(format!("mounting tmpfs on {dir}")))
}

/// Attaches `image` read-only to a free loop device and returns the device node.
fn loop_attach(image: &Path) -> Result<PathBuf, Stage1Error> {
    let control = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(io_err("opening /dev/loop-control"))?;
    let n = loop_ioctl::get_free(&control).map_err(sys_err("finding a free loop device"))?;
    let dev = PathBuf::from(format!("/dev/loop{n}"));
    let loop_file = fs::OpenOptions::new()
        .read(true)
        .open(&dev)
        .map_err(io_err(format!("opening {}", dev.display())))?;
    // A backing file opened read-only makes the loop device read-only.
    let backing = fs::File::open(image).map_err(io_err(format!("opening {}", image.display())))?;
    loop_ioctl::set_fd(&loop_file, &backing).map_err(sys_err(format!(
        "attaching {} to {}",
        image.display(),
        dev.display()
    )))?;
    Ok(dev)
}

/// The two loop ioctls stage-1 needs. They only pass integers (a device number, a descriptor
/// this process owns), so the unsafe calls cannot touch memory.
#[allow(unsafe_code)]
mod loop_ioctl {
    use std::os::fd::{AsRawFd, RawFd};

    nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
    nix::ioctl_write_int_bad!(loop_set_fd, 0x4C00);

    pub fn get_free(control: &impl AsRawFd) -> nix::Result<i32> {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument.
        unsafe { loop_ctl_get_free(control.as_raw_fd()) }
    }

    pub fn set_fd(loop_dev: &impl AsRawFd, backing: &impl AsRawFd) -> nix::Result<()> {
        let fd: RawFd = backing.as_raw_fd();
        // SAFETY: LOOP_SET_FD takes the backing descriptor by value.
        unsafe { loop_set_fd(loop_dev.as_raw_fd(), fd) }.map(drop)
    }
}

fn switch_root(prepared: Prepared, init_argv: &[String]) -> Result<Never, Stage1Error> {
    use nix::mount::{MsFlags, mount};
    let upper = prepared.upper_base.join("upper");
    let work = prepared.upper_base.join("work");
    for dir in [&upper, &work] {
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    let opts = format!(
        "lowerdir={RO},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        NEWROOT,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(sys_err(format!("mounting the overlay ({opts})")))?;
    // /sbin/init is usually an absolute symlink, only valid once the new root is `/`.
    if Path::new(NEWROOT)
        .join("sbin/init")
        .symlink_metadata()
        .is_err()
    {
        return Err(Stage1Error::Io {
            what: "the root image has no /sbin/init".into(),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    // /run carries the medium, the image and the writable layer: it moves with the others.
    for dir in ["/dev", "/proc", "/sys", "/run"] {
        let target = format!("{NEWROOT}{dir}");
        fs::create_dir_all(&target).map_err(io_err(format!("creating {target}")))?;
        mount(
            Some(dir),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(sys_err(format!("moving {dir} to {target}")))?;
    }
    // Printed right before control passes to the real init; tests wait for it.
    say("switching root");
    nix::unistd::chdir(NEWROOT).map_err(sys_err(format!("entering {NEWROOT}")))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys_err("moving the new root onto /"))?;
    nix::unistd::chroot(".").map_err(sys_err("chroot into the new root"))?;
    nix::unistd::chdir("/").map_err(sys_err("entering /"))?;
    let argv: Vec<CString> = init_argv
        .iter()
        .map(|a| CString::new(a.as_str()).expect("no NUL in init arguments"))
        .collect();
    let err = nix::unistd::execv(&argv[0], &argv).unwrap_err();
    Err(Stage1Error::Sys {
        what: "executing /sbin/init".into(),
        source: err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_splits_like_the_kernel() {
        let c = Cmdline::parse(
            "BOOT_IMAGE=/live/vmlinuz quiet kiln.root=live:KILN_LIVE console=ttyS0,115200 console=tty0 \
             x=\"a b\" kiln.install=auto\n",
        );
        assert_eq!(c.get("kiln.root"), Some("live:KILN_LIVE"));
        assert_eq!(c.get("console"), Some("tty0"), "later values win");
        assert_eq!(c.get("x"), Some("a b"));
        assert!(c.has_flag("quiet"));
        assert_eq!(c.get("quiet"), None);
        assert_eq!(c.get("missing"), None);
    }

    #[test]
    fn an_unattended_install_boots_the_install_target_unless_told_otherwise() {
        let argv = |s: &str| init_argv(&Cmdline::parse(s));
        assert_eq!(argv("kiln.root=live:K console=ttyS0"), ["/sbin/init"]);
        assert_eq!(argv("kiln.slot=A kiln.disk=g"), ["/sbin/init"]);
        assert_eq!(
            argv("kiln.root=live:K kiln.install=auto"),
            ["/sbin/init", "--unit=kiln-install.target"]
        );
        assert_eq!(
            argv("kiln.install=auto systemd.unit=rescue.target"),
            ["/sbin/init"],
            "the command line's own unit wins"
        );
    }

    #[test]
    fn root_source_decisions() {
        let rs = |s: &str| root_source(&Cmdline::parse(s));
        assert_eq!(
            rs("kiln.root=live:KILN_LIVE").unwrap(),
            RootSource::Live {
                label: "KILN_LIVE".into()
            }
        );
        let sha = "ab".repeat(32);
        assert_eq!(
            rs(&format!(
                "kiln.root=http://10.0.0.1:8080/pxe/rootfs.squashfs kiln.root.sha256={sha}"
            ))
            .unwrap(),
            RootSource::Http {
                url: "http://10.0.0.1:8080/pxe/rootfs.squashfs".into(),
                sha256: sha.clone(),
            }
        );
        assert!(matches!(
            rs("kiln.root=http://10.0.0.1/rootfs.squashfs"),
            Err(Stage1Error::NoDigest(_))
        ));
        assert!(matches!(
            rs("kiln.root=http://10.0.0.1/rootfs.squashfs kiln.root.sha256=abc"),
            Err(Stage1Error::NoDigest(_))
        ));
        let guid = "6f1c2a3b-0000-4000-8000-0123456789ab";
        assert_eq!(
            rs(&format!("kiln.slot=B kiln.disk={guid}")).unwrap(),
            RootSource::Installed {
                slot: Slot::B,
                disk: guid.parse().unwrap()
            }
        );
        assert!(matches!(rs("kiln.slot=A"), Err(Stage1Error::NoDisk)));
        assert_eq!(
            rs("kiln.slot=A kiln.root=live:X").unwrap(),
            RootSource::Live { label: "X".into() },
            "a live medium wins over an installed slot"
        );
        assert!(matches!(rs("quiet"), Err(Stage1Error::NoRoot)));
        assert!(matches!(rs("kiln.slot=C"), Err(Stage1Error::BadSlot(s)) if s == "C"));
        assert!(matches!(
            rs("kiln.root=live:"),
            Err(Stage1Error::BadRoot(_))
        ));
        assert!(matches!(
            rs("kiln.root=https://x/y"),
            Err(Stage1Error::BadRoot(_))
        ));
    }

    #[test]
    fn iso9660_label_from_primary_volume_descriptor() {
        let mut pvd = vec![0u8; 2048];
        pvd[0] = 1;
        pvd[1..6].copy_from_slice(b"CD001");
        pvd[40..72].copy_from_slice(format!("{:<32}", "KILN_LIVE").as_bytes());
        assert_eq!(iso9660_volume_id(&pvd).as_deref(), Some("KILN_LIVE"));
        pvd[1] = b'X';
        assert_eq!(iso9660_volume_id(&pvd), None);
        assert_eq!(iso9660_volume_id(&[1, b'C']), None);
    }

    #[test]
    fn gpt_headers_name_their_disk() {
        let guid: uuid::Uuid = "6f1c2a3b-1122-4334-8556-0123456789ab".parse().unwrap();
        let mut header = vec![0u8; 92];
        header[..8].copy_from_slice(b"EFI PART");
        header[56..72].copy_from_slice(&guid.to_bytes_le());
        assert_eq!(gpt_disk_guid(&header), Some(guid));
        header[0] = b'X';
        assert_eq!(gpt_disk_guid(&header), None);
        assert_eq!(gpt_disk_guid(b"EFI PART"), None);
    }

    #[test]
    fn uevent_partition_names() {
        let (dev, part) = uevent_names(
            "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\nPARTN=2\nPARTNAME=KILN_A\n",
        );
        assert_eq!((dev, part), (Some("vda2"), Some("KILN_A")));
        assert_eq!(uevent_names("DEVNAME=sr0\n"), (Some("sr0"), None));
    }
}
