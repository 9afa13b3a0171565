//! Real firmware netboots from `kiln pxe serve`: QEMU with SeaBIOS + the iPXE ROM, and with
//! OVMF, in authoritative mode and in proxy mode next to dnsmasq (the network's existing DHCP
//! server, without PXE options), to a marker the booted initramfs prints on the serial line.

mod common;
mod pxe_support;

use std::time::Duration;

use common::require;
use kiln_lab::netns::Netns;
use kiln_lab::qemu::{Firmware, Nic, Vm};
use pxe_support::{BRIDGE, Lab, fixtures};

/// Generous: UEFI PXE under software emulation takes ~25 s; this only prevents hangs.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Authoritative,
    ProxyNextToDnsmasq,
}

fn netboot(firmware: Firmware, mode: Mode, mac: &str) {
    require("qemu-system-x86_64", "qemu-system-x86");
    require("dnsmasq", "dnsmasq");
    let bundle = fixtures();
    let mut lab = Lab::new();
    lab.ns.add_tap("tap0", BRIDGE).unwrap();
    // Ends iPXE's wait for IPv6 autoconfiguration at once.
    let _ra = lab.ns.start_router_advertisements(BRIDGE).unwrap();
    let inventory = lab.inventory(&[("node-01", mac, None)]);
    let bundle_dir = bundle.to_str().unwrap().to_string();
    let inventory = inventory.to_str().unwrap().to_string();
    let mut args = vec!["--artifacts", &bundle_dir, "--inventory", &inventory];
    let dhcp_ns;
    let _dnsmasq;
    match mode {
        Mode::Authoritative => {
            args.extend([
                "--mode",
                "dhcp",
                "--pool-start",
                "10.33.0.100",
                "--pool-end",
                "10.33.0.150",
            ]);
        }
        Mode::ProxyNextToDnsmasq => {
            args.extend(["--mode", "proxy"]);
            // The existing DHCP server: another host on the same segment.
            dhcp_ns = Netns::create("kpxd").unwrap();
            let port = kiln_lab::netns::unique_name("vd");
            lab.ns.add_veth(&port, &dhcp_ns, "eth0").unwrap();
            lab.ns.set_master(&port, BRIDGE).unwrap();
            dhcp_ns.add_address("eth0", "10.33.0.2/24").unwrap();
            let leases = lab.path("dnsmasq.leases");
            let mut cmd = dhcp_ns.command("dnsmasq");
            cmd.args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                "--user=root",
                "--interface=eth0",
                "--bind-interfaces",
                "--dhcp-range=10.33.0.200,10.33.0.250,255.255.255.0,1h",
                "--pid-file=",
            ])
            .arg(format!("--dhcp-leasefile={}", leases.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
            _dnsmasq = dhcp_ns.spawn(&mut cmd).unwrap();
        }
    }
    lab.serve(&args);

    let builder = Vm::builder()
        .name(format!("pxe-{firmware}"))
        .firmware(firmware)
        .memory_mib(768)
        .netns(lab.ns.name())
        .work_dir(lab.path("vm"))
        .no_reboot(true);
    let builder = match firmware {
        // SeaBIOS netboots through the NIC's option ROM, which is iPXE (Debian ipxe-qemu).
        Firmware::Bios => builder.nic(Nic::Tap {
            ifname: "tap0".into(),
            mac: mac.into(),
            bootindex: Some(1),
        }),
        // Without the option ROM, OVMF uses its own PXE client (EDK2's PxeBc), which
        // chain-loads iPXE over TFTP: the path real UEFI machines take.
        Firmware::Uefi => builder.extra_args([
            "-netdev".to_string(),
            "tap,id=pxe0,ifname=tap0,script=no,downscript=no".into(),
            "-device".into(),
            format!("virtio-net-pci,netdev=pxe0,mac={mac},bootindex=1,romfile="),
        ]),
    };
    let mut vm = builder.spawn().unwrap();
    let line = vm
        .wait_for_console("KILN-NETBOOT-MARKER", BOOT_TIMEOUT)
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n--- trace ---\n{}\n--- server ---\n{}",
                lab.trace(mac, false),
                lab.server_log()
            )
        });
    let mac_path = mac.replace(':', "-");
    assert!(
        line.contains(&format!(
            "kiln.config=http://10.33.0.1:8080/config/{mac_path}"
        )),
        "kernel command line is not the node's script: {line}"
    );
    drop(vm);

    let timeline = lab.trace(mac, false);
    let mut steps = vec![
        "discover received on port 67".to_string(),
        "from iPXE".to_string(),
        format!("boot file http://10.33.0.1:8080/boot/{mac_path}/boot.ipxe"),
        format!("GET /boot/{mac_path}/boot.ipxe"),
        format!("GET /boot/{mac_path}/vmlinuz from 10.33.0."),
        format!("GET /boot/{mac_path}/initrd.img from 10.33.0."),
    ];
    if firmware == Firmware::Uefi {
        // OVMF's own PXE client chain-loads iPXE over TFTP first; QEMU's BIOS NIC ROM is iPXE.
        steps.push("arch 7 (x86-64 UEFI)".into());
        steps.push("boot file ipxe.efi".into());
        steps.push("ipxe.efi to 10.33.0.".into());
    }
    for step in steps {
        assert!(
            timeline.contains(&step),
            "trace lacks {step:?}:\n{timeline}"
        );
    }
    if mode == Mode::Authoritative {
        assert!(
            timeline.contains("ack sent, address 10.33.0.100"),
            "{timeline}"
        );
    } else {
        if firmware == Firmware::Uefi {
            // EDK2 asks the proxy for the boot file on the PXE port once it has an address.
            assert!(timeline.contains("received on port 4011"), "{timeline}");
        }
        assert!(
            !timeline.contains("address 10.33.0."),
            "proxy handed out an address:\n{timeline}"
        );
    }
    assert!(timeline.contains("no failures"), "{timeline}");
    lab.stop_server();
}

#[test]
fn seabios_ipxe_rom_netboots_from_the_authoritative_server() {
    netboot(Firmware::Bios, Mode::Authoritative, "52:54:00:3a:00:01");
}

#[test]
fn seabios_ipxe_rom_netboots_through_proxy_dhcp_next_to_dnsmasq() {
    netboot(
        Firmware::Bios,
        Mode::ProxyNextToDnsmasq,
        "52:54:00:3a:00:02",
    );
}

#[test]
fn ovmf_netboots_from_the_authoritative_server() {
    netboot(Firmware::Uefi, Mode::Authoritative, "52:54:00:3a:00:03");
}

#[test]
fn ovmf_netboots_through_proxy_dhcp_next_to_dnsmasq() {
    netboot(
        Firmware::Uefi,
        Mode::ProxyNextToDnsmasq,
        "52:54:00:3a:00:04",
    );
}
