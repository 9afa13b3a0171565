//! The installed node's one message to the provisioner that rolled it out: "ready", with the
//! slot it runs from and its image, posted to the phone-home URL the installer left behind
//! (with the installer's own client). Nodes installed from an ISO have no enrolment record and
//! say nothing.

use std::time::Duration;

use kiln_installer::phonehome::{PhoneHome, PhoneHomeError};
use kiln_spec::enrol::{ENROLMENT_PATH, Enrolment, Phase, Report};

use crate::sysroot::Sysroot;

/// Tries before giving up, about ten minutes: the boot network may come up after the agent,
/// and a restarted rollout takes a moment to listen again.
const ATTEMPTS: u32 = 30;
const FIRST_PAUSE: Duration = Duration::from_secs(2);
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

/// The enrolment record, if this node was installed by a rollout.
pub fn load(sysroot: &Sysroot) -> Option<Enrolment> {
    let bytes = sysroot.read(ENROLMENT_PATH).ok()??;
    match serde_json::from_slice(&bytes) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!("{ENROLMENT_PATH} is not an enrolment record: {e}");
            None
        }
    }
}

/// Posts `agent-ready` until the provisioner takes it; a refusal (the rollout is over, the
/// token expired) ends it too. Blocking: run it on its own thread.
pub fn report_ready(enrolment: Enrolment, slot: String) {
    let client = match PhoneHome::new(&enrolment.phone_home, Some(enrolment.token.clone())) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("{e}");
            return;
        }
    };
    let report = Report {
        slot: Some(slot),
        image_sha256: Some(enrolment.image_sha256.clone()),
        ..Report::new(Phase::AgentReady, None)
    };
    let mut pause = FIRST_PAUSE;
    for attempt in 1..=ATTEMPTS {
        match client.send(&report) {
            Ok(()) => {
                tracing::info!("reported ready to {}", enrolment.phone_home);
                return;
            }
            Err(e @ PhoneHomeError::Send { refused: true, .. }) => {
                tracing::info!("the provisioner declined the ready report: {e}");
                return;
            }
            Err(e) => tracing::debug!(attempt, "{e}"),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
    tracing::warn!("could not report ready to {}", enrolment.phone_home);
}
