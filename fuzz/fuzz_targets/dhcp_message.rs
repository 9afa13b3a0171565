//! Any datagram through the DHCP decoder and the whole request handler, in both modes: no
//! panic, and every reply encodes.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::OnceLock;

use dhcproto::Encodable;
use kiln_netboot::backend::{InventoryBackend, UnknownMacs};
use kiln_netboot::dhcp::{
    AddressSettings, BootSettings, DhcpSettings, Outcome, PXE_PORT, SERVER_PORT, decode, handle,
};
use kiln_netboot::leases::LeasePool;
use kiln_spec::inventory::NetbootMode;
use libfuzzer_sys::fuzz_target;

fn backend() -> &'static InventoryBackend {
    static B: OnceLock<InventoryBackend> = OnceLock::new();
    B.get_or_init(|| {
        let inv = kiln_spec::Inventory::from_yaml(
            "apiVersion: kiln.dev/v1alpha1\nkind: Inventory\nspec:\n  nodes:\n    - name: n1\n      bootMACs: [\"52:54:00:00:00:01\"]\n      bootAddress: 10.0.0.9\n",
        )
        .unwrap();
        InventoryBackend::new(inv, UnknownMacs::Discovery)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = decode(data) else { return };
    let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 50), 68);
    for mode in [NetbootMode::Proxy, NetbootMode::Dhcp] {
        let settings = DhcpSettings {
            mode,
            boot: BootSettings {
                server_ip: Ipv4Addr::new(10, 0, 0, 1),
                http_base: "http://10.0.0.1:8080".into(),
                bios_file: "undionly.kpxe".into(),
                efi_file: "ipxe.efi".into(),
            },
            addressing: AddressSettings {
                subnet_mask: Ipv4Addr::new(255, 255, 255, 0),
                router: Some(Ipv4Addr::new(10, 0, 0, 1)),
                dns: vec![Ipv4Addr::new(10, 0, 0, 1)],
            },
        };
        let mut pool = LeasePool::new(
            Ipv4Addr::new(10, 0, 0, 100),
            Ipv4Addr::new(10, 0, 0, 103),
            600,
        );
        for port in [SERVER_PORT, PXE_PORT] {
            let pool = (mode == NetbootMode::Dhcp).then_some(&mut pool);
            if let (Outcome::Reply { msg, .. }, _) =
                handle(&settings, backend(), pool, &msg, port, src, 1000)
            {
                msg.to_vec().expect("replies always encode");
            }
        }
    }
});
