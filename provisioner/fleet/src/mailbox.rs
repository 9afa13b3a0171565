//! Where tasks outside the reconcile engine (BMC calls, agent requests, phone-home reports)
//! leave what they saw of a node, for the controller they wake.

use std::sync::{Mutex, OnceLock};

use kiln_agent::engine::Trigger;

/// Per-node observations in arrival order, waiting for one controller.
#[derive(Debug)]
pub struct Mailbox<O> {
    queue: Mutex<Vec<(String, O)>>,
    wake: OnceLock<(Trigger, &'static str)>,
}

impl<O> Default for Mailbox<O> {
    fn default() -> Self {
        Mailbox {
            queue: Mutex::new(Vec::new()),
            wake: OnceLock::new(),
        }
    }
}

impl<O> Mailbox<O> {
    /// From now on, each post wakes `controller` through `trigger`.
    pub fn connect(&self, trigger: Trigger, controller: &'static str) {
        let _ = self.wake.set((trigger, controller));
    }

    pub fn post(&self, node: &str, obs: O) {
        self.queue
            .lock()
            .expect("mailbox lock")
            .push((node.to_string(), obs));
        if let Some((trigger, controller)) = self.wake.get() {
            trigger.wake(controller);
        }
    }

    /// Everything posted since the last take, oldest first.
    pub fn take(&self) -> Vec<(String, O)> {
        std::mem::take(&mut *self.queue.lock().expect("mailbox lock"))
    }
}
