//! Starts COUNT ipmi_sim BMCs on loopback (no machines attached), writes an inventory of them
//! to DIR/fleet.yaml (password in DIR/password, one port a line in DIR/ports), prints "ready"
//! and keeps them running until standard input closes. Used by benches/bmc.sh.
//!
//!     cargo run -p kiln-bmc --example ipmi_sim_fleet -- 200 /tmp/fleet

use std::fmt::Write as _;
use std::io::Read;

use kiln_lab::ipmi_sim::IpmiSim;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: usize = args
        .next()
        .ok_or("usage: ipmi_sim_fleet COUNT DIR")?
        .parse()?;
    let dir = std::path::PathBuf::from(args.next().ok_or("usage: ipmi_sim_fleet COUNT DIR")?);
    std::fs::create_dir_all(&dir)?;
    let mut sims = Vec::with_capacity(count);
    for i in 0..count {
        sims.push(IpmiSim::builder(format!("bench-{i}")).start()?);
        if (i + 1) % 50 == 0 {
            eprintln!("started {} of {count} simulators", i + 1);
        }
    }
    std::fs::write(dir.join("password"), sims[0].password())?;
    let mut inventory =
        String::from("apiVersion: kiln.dev/v1alpha1\nkind: Inventory\nspec:\n  nodes:\n");
    let mut ports = String::new();
    for (i, sim) in sims.iter().enumerate() {
        writeln!(
            inventory,
            "    - name: node-{i:03}\n      bmc: {{protocol: ipmi, address: 127.0.0.1, port: {}, username: {}, passwordRef: {{file: password}}}}",
            sim.port(),
            sim.username()
        )?;
        writeln!(ports, "{}", sim.port())?;
    }
    std::fs::write(dir.join("fleet.yaml"), inventory)?;
    std::fs::write(dir.join("ports"), ports)?;
    println!("ready");
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest)?;
    Ok(())
}
