//! The IPMI driver against OpenIPMI's ipmi_sim on loopback, and against the faults a fleet
//! meets: wrong passwords, silent ports, slow BMCs and malformed replies (through a UDP proxy
//! in front of a real ipmi_sim).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_bmc::ipmi::CipherSuite;
use kiln_bmc::{BmcError, BmcProtocol, BmcTarget, Password, PowerState};
use kiln_lab::ipmi_sim::IpmiSim;
use tokio::net::UdpSocket;

/// Bound on any one test step, so that a hang fails instead of blocking the suite.
const HANG: Duration = Duration::from_secs(30);

fn target(sim: &IpmiSim, port: u16) -> BmcTarget {
    BmcTarget {
        protocol: BmcProtocol::Ipmi,
        host: "127.0.0.1".into(),
        port,
        username: sim.username().into(),
        password: Password::new(sim.password()),
        ca_cert: None,
        insecure: false,
        plain_http: false,
        timeout: Duration::from_millis(500),
        retries: 2,
        cipher_suite: CipherSuite::Suite3,
    }
}

async fn power_status(t: BmcTarget) -> Result<PowerState, BmcError> {
    let bmc = kiln_bmc::connect(t).unwrap();
    let r = tokio::time::timeout(HANG, bmc.power_status())
        .await
        .expect("the driver hung");
    let _ = tokio::time::timeout(HANG, bmc.close()).await;
    r
}

/// Rewrites the `n`th reply datagram.
type Mangle = fn(usize, &[u8]) -> Vec<u8>;

/// A UDP relay to `upstream` that delays every datagram by `delay` and passes replies through
/// `mangle`.
async fn relay(upstream: SocketAddr, delay: Duration, mangle: fn(usize, &[u8]) -> Vec<u8>) -> u16 {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(upstream).await.unwrap();
    let port = front.local_addr().unwrap().port();
    let client = Arc::new(tokio::sync::Mutex::new(None::<SocketAddr>));
    {
        let (front, back, client) = (front.clone(), back.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().await = Some(from);
                let (back, data) = (back.clone(), buf[..n].to_vec());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = back.send(&data).await;
                });
            }
        });
    }
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        let mut count = 0;
        while let Ok(n) = back.recv(&mut buf).await {
            let Some(to) = *client.lock().await else {
                continue;
            };
            let (front, data) = (front.clone(), mangle(count, &buf[..n]));
            count += 1;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = front.send_to(&data, to).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn wrong_password_is_an_auth_error() {
    let sim = IpmiSim::builder("kiln-fault-auth").start().unwrap();
    let mut t = target(&sim, sim.port());
    t.password = Password::new("not-the-password");
    let err = power_status(t).await.unwrap_err();
    assert!(matches!(err, BmcError::Auth(_)), "{err}");
}

#[tokio::test]
async fn unknown_user_is_an_auth_error() {
    let sim = IpmiSim::builder("kiln-fault-user").start().unwrap();
    let mut t = target(&sim, sim.port());
    t.username = "nobody".into();
    let err = power_status(t).await.unwrap_err();
    assert!(matches!(err, BmcError::Auth(_)), "{err}");
}

#[tokio::test]
async fn a_silent_port_times_out() {
    // Bound but never answering: every datagram is swallowed.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let t = BmcTarget {
        protocol: BmcProtocol::Ipmi,
        host: "127.0.0.1".into(),
        port,
        username: "admin".into(),
        password: Password::new("x"),
        ca_cert: None,
        insecure: false,
        plain_http: false,
        timeout: Duration::from_millis(300),
        retries: 1,
        cipher_suite: CipherSuite::Suite3,
    };
    let err = power_status(t).await.unwrap_err();
    match err {
        BmcError::Timeout { after, .. } => assert_eq!(after, Duration::from_millis(600)),
        other => panic!("expected a timeout, got {other}"),
    }
}

#[tokio::test]
async fn a_closed_port_is_unreachable() {
    let port = {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.local_addr().unwrap().port()
    };
    let sim = IpmiSim::builder("kiln-fault-closed").start().unwrap();
    let err = power_status(target(&sim, port)).await.unwrap_err();
    assert!(matches!(err, BmcError::Unreachable { .. }), "{err}");
}

#[tokio::test]
async fn a_slow_bmc_still_answers() {
    let sim = IpmiSim::builder("kiln-fault-slow").start().unwrap();
    // 150 ms each way: 300 ms per exchange, inside the 500 ms per-attempt wait.
    let port = relay(sim.addr(), Duration::from_millis(150), |_, d| d.to_vec()).await;
    assert_eq!(
        power_status(target(&sim, port)).await.unwrap(),
        PowerState::Off
    );
}

#[tokio::test]
async fn a_bmc_slower_than_one_attempt_is_answered_across_retransmissions() {
    let sim = IpmiSim::builder("kiln-fault-slower").start().unwrap();
    // 800 ms per exchange against a 500 ms wait: the reply to the first transmission arrives
    // while the driver waits on the retransmission, and is accepted.
    let port = relay(sim.addr(), Duration::from_millis(400), |_, d| d.to_vec()).await;
    assert_eq!(
        power_status(target(&sim, port)).await.unwrap(),
        PowerState::Off
    );
}

#[tokio::test]
async fn malformed_replies_are_protocol_errors() {
    let sim = IpmiSim::builder("kiln-fault-garbage").start().unwrap();
    let manglers: [Mangle; 4] = [
        // Truncated datagrams.
        |_, d| d[..d.len() / 2].to_vec(),
        // Bit flips in the handshake.
        |_, d| {
            let mut d = d.to_vec();
            let last = d.len() - 1;
            d[last] ^= 0x55;
            d
        },
        // Noise.
        |i, d| (0..d.len()).map(|j| (i * 31 + j * 7) as u8).collect(),
        // A sound handshake, then tampered session traffic (the AuthCode no longer matches).
        |i, d| {
            let mut d = d.to_vec();
            if i >= 4 {
                let mid = d.len() / 2;
                d[mid] ^= 1;
            }
            d
        },
    ];
    for (n, mangle) in manglers.into_iter().enumerate() {
        let port = relay(sim.addr(), Duration::ZERO, mangle).await;
        let err = power_status(target(&sim, port)).await.unwrap_err();
        assert!(matches!(err, BmcError::Protocol(_)), "mangler {n}: {err}");
    }
}

#[tokio::test]
async fn cipher_suite_17_refused_by_ipmi_sim_is_unsupported() {
    // ipmi_sim 2.0.33 has no SHA-256 suites; the refusal must be reported as such.
    let sim = IpmiSim::builder("kiln-suite17").start().unwrap();
    let mut t = target(&sim, sim.port());
    t.cipher_suite = CipherSuite::Suite17;
    let err = power_status(t).await.unwrap_err();
    assert!(matches!(err, BmcError::Unsupported(_)), "{err}");
}
