//! A small controller runtime in the style of Talos machined, shared by the node agent and the
//! fleet controller.
//!
//! - Resources are typed values keyed by `(kind, id)` in an in-memory [`State`].
//! - Each [`Controller`] declares the kinds it reads (`inputs`) and writes (`outputs`).
//!   Registration refuses a second writer for a kind; a controller cannot read or write a kind
//!   it did not declare.
//! - Level-triggered: a controller is woken (by a change to one of its inputs, an outside
//!   [`Trigger`], a failed attempt's backoff expiring, or the periodic resync) and then re-reads
//!   everything it needs; it never sees "what changed". So `reconcile` must be idempotent: run
//!   twice on the same inputs it makes the same outputs and no further change.
//! - Writing an equal value is not a change, so a converged system goes quiet.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A value kept in the engine's state.
pub trait Resource: Clone + PartialEq + Send + Sync + 'static {
    const KIND: &'static str;
}

pub type ReconcileError = Box<dyn std::error::Error + Send + Sync>;

pub trait Controller: Send {
    fn name(&self) -> &'static str;
    fn inputs(&self) -> Vec<&'static str>;
    fn outputs(&self) -> Vec<&'static str>;
    /// Brings the outputs in line with the inputs (and, for controllers that own host state,
    /// the host in line with the outputs).
    fn reconcile(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ReconcileError>;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    #[error("kind {kind} is written by {first}; {second} cannot write it too")]
    SecondWriter {
        kind: &'static str,
        first: &'static str,
        second: &'static str,
    },
    #[error("controller {0} is registered twice")]
    DuplicateController(&'static str),
    #[error("controller {controller} did not declare {kind} as an input")]
    NotAnInput {
        controller: &'static str,
        kind: &'static str,
    },
    #[error("controller {controller} did not declare {kind} as an output")]
    NotAnOutput {
        controller: &'static str,
        kind: &'static str,
    },
}

/// Resources by kind and id.
#[derive(Default)]
pub struct State {
    kinds: HashMap<&'static str, BTreeMap<String, Box<dyn Any + Send + Sync>>>,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts: BTreeMap<_, _> = self.kinds.iter().map(|(k, v)| (*k, v.len())).collect();
        f.debug_struct("State").field("kinds", &counts).finish()
    }
}

impl State {
    pub fn get<R: Resource>(&self, id: &str) -> Option<&R> {
        self.kinds.get(R::KIND)?.get(id)?.downcast_ref()
    }

    pub fn list<R: Resource>(&self) -> Vec<(&str, &R)> {
        self.kinds
            .get(R::KIND)
            .map(|m| {
                m.iter()
                    .filter_map(|(id, v)| Some((id.as_str(), v.downcast_ref::<R>()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stores `value`; true when it differs from what was there.
    fn put<R: Resource>(&mut self, id: &str, value: R) -> bool {
        let m = self.kinds.entry(R::KIND).or_default();
        if m.get(id).and_then(|v| v.downcast_ref::<R>()) == Some(&value) {
            return false;
        }
        m.insert(id.to_string(), Box::new(value));
        true
    }

    fn remove<R: Resource>(&mut self, id: &str) -> bool {
        self.kinds
            .get_mut(R::KIND)
            .is_some_and(|m| m.remove(id).is_some())
    }
}

/// What a controller sees while it reconciles: its declared inputs and outputs only.
pub struct Ctx<'a> {
    controller: &'static str,
    inputs: &'a [&'static str],
    outputs: &'a [&'static str],
    state: &'a mut State,
    changed: &'a mut BTreeSet<&'static str>,
}

impl fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctx")
            .field("controller", &self.controller)
            .finish()
    }
}

impl Ctx<'_> {
    fn readable(&self, kind: &'static str) -> Result<(), EngineError> {
        if self.inputs.contains(&kind) || self.outputs.contains(&kind) {
            Ok(())
        } else {
            Err(EngineError::NotAnInput {
                controller: self.controller,
                kind,
            })
        }
    }

    fn writable(&self, kind: &'static str) -> Result<(), EngineError> {
        if self.outputs.contains(&kind) {
            Ok(())
        } else {
            Err(EngineError::NotAnOutput {
                controller: self.controller,
                kind,
            })
        }
    }

    pub fn get<R: Resource>(&self, id: &str) -> Result<Option<R>, EngineError> {
        self.readable(R::KIND)?;
        Ok(self.state.get::<R>(id).cloned())
    }

    pub fn list<R: Resource>(&self) -> Result<Vec<(String, R)>, EngineError> {
        self.readable(R::KIND)?;
        Ok(self
            .state
            .list::<R>()
            .into_iter()
            .map(|(id, r)| (id.to_string(), r.clone()))
            .collect())
    }

    /// Writes an output; controllers that read this kind are woken if the value changed.
    pub fn put<R: Resource>(&mut self, id: &str, value: R) -> Result<bool, EngineError> {
        self.writable(R::KIND)?;
        let changed = self.state.put(id, value);
        if changed {
            self.changed.insert(R::KIND);
        }
        Ok(changed)
    }

    pub fn remove<R: Resource>(&mut self, id: &str) -> Result<bool, EngineError> {
        self.writable(R::KIND)?;
        let changed = self.state.remove::<R>(id);
        if changed {
            self.changed.insert(R::KIND);
        }
        Ok(changed)
    }
}

/// Told about every reconcile (metrics, logs).
pub trait Observer: Send {
    fn reconciled(
        &self,
        controller: &'static str,
        took: Duration,
        result: Result<(), &ReconcileError>,
    );
}

enum Signal {
    Wake(String),
    ResyncAll,
    WhenIdle(mpsc::Sender<()>),
    Stop,
}

/// Wakes controllers of a running [`Runtime`] from other threads (file watchers, the API,
/// signal handlers).
#[derive(Clone)]
pub struct Trigger(mpsc::Sender<Signal>);

impl fmt::Debug for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Trigger")
    }
}

impl Trigger {
    pub fn wake(&self, controller: &str) {
        let _ = self.0.send(Signal::Wake(controller.to_string()));
    }

    pub fn resync(&self) {
        let _ = self.0.send(Signal::ResyncAll);
    }

    /// Wakes `controller` and waits until it and everything it woke in turn have run.
    /// False on timeout or when the runtime has stopped.
    pub fn wake_and_wait(&self, controller: &str, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        self.wake(controller);
        if self.0.send(Signal::WhenIdle(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
    }

    pub fn stop(&self) {
        let _ = self.0.send(Signal::Stop);
    }
}

/// Work too long for a reconcile (a bring-up, a slow probe) on a thread of its own. It wakes
/// `controller` at each step it reports and once its result is ready; the controller takes the
/// result in a later reconcile, so the engine stays free for the others meanwhile.
pub struct Background<T> {
    step: std::sync::Arc<std::sync::Mutex<String>>,
    result: mpsc::Receiver<T>,
}

impl<T> fmt::Debug for Background<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Background")
            .field(
                "step",
                &self.step.lock().map(|s| s.clone()).unwrap_or_default(),
            )
            .finish()
    }
}

impl<T: Send + 'static> Background<T> {
    pub fn spawn(
        controller: &'static str,
        trigger: Trigger,
        work: impl FnOnce(&(dyn Fn(&str) + Sync)) -> T + Send + 'static,
    ) -> Background<T> {
        let step = std::sync::Arc::new(std::sync::Mutex::new("starting".to_string()));
        let seen = step.clone();
        let (tx, result) = mpsc::channel();
        std::thread::spawn(move || {
            let progress = |s: &str| {
                tracing::info!("{controller}: {s}");
                if let Ok(mut step) = seen.lock() {
                    *step = s.to_string();
                }
                trigger.wake(controller);
            };
            // The result is there before the wake-up, so the reconcile it causes finds it.
            let _ = tx.send(work(&progress));
            trigger.wake(controller);
        });
        Background { step, result }
    }

    /// The last step the work reported.
    pub fn step(&self) -> String {
        self.step.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The work's result once it is ready (then never again); `None` while it runs.
    pub fn take(&mut self) -> Option<Result<T, ReconcileError>> {
        match self.result.try_recv() {
            Ok(out) => Some(Ok(out)),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                Some(Err("a background thread ended without a result".into()))
            }
        }
    }
}

struct Slot {
    controller: Box<dyn Controller>,
    inputs: Vec<&'static str>,
    outputs: Vec<&'static str>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// Backoff after a failed reconcile: doubles from `MIN_BACKOFF` up to `MAX_BACKOFF`, reset by
/// a success.
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Runtime {
    slots: Vec<Slot>,
    writers: HashMap<&'static str, &'static str>,
    state: State,
    pending: BTreeSet<usize>,
    tx: mpsc::Sender<Signal>,
    rx: mpsc::Receiver<Signal>,
    observer: Option<Box<dyn Observer>>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.slots.iter().map(|s| s.controller.name()).collect();
        f.debug_struct("Runtime")
            .field("controllers", &names)
            .field("state", &self.state)
            .finish()
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Self::new()
    }
}

impl Runtime {
    pub fn new() -> Runtime {
        let (tx, rx) = mpsc::channel();
        Runtime {
            slots: Vec::new(),
            writers: HashMap::new(),
            state: State::default(),
            pending: BTreeSet::new(),
            tx,
            rx,
            observer: None,
        }
    }

    pub fn set_observer(&mut self, observer: Box<dyn Observer>) {
        self.observer = Some(observer);
    }

    /// Adds a controller; it runs at the first pass. Controllers run in registration order
    /// within a pass, so register producers before consumers.
    pub fn register(&mut self, controller: Box<dyn Controller>) -> Result<(), EngineError> {
        let name = controller.name();
        if self.slots.iter().any(|s| s.controller.name() == name) {
            return Err(EngineError::DuplicateController(name));
        }
        let outputs = controller.outputs();
        for kind in &outputs {
            if let Some(first) = self.writers.get(kind) {
                return Err(EngineError::SecondWriter {
                    kind,
                    first,
                    second: name,
                });
            }
        }
        for kind in &outputs {
            self.writers.insert(kind, name);
        }
        self.pending.insert(self.slots.len());
        self.slots.push(Slot {
            inputs: controller.inputs(),
            outputs,
            controller,
            retry_at: None,
            backoff: MIN_BACKOFF,
        });
        Ok(())
    }

    pub fn trigger(&self) -> Trigger {
        Trigger(self.tx.clone())
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Runs woken controllers, and those their writes wake, until nothing is pending.
    /// Failed controllers are not retried here (their backoff runs in [`Runtime::run`]).
    /// Returns the number of reconciles.
    pub fn run_until_idle(&mut self) -> usize {
        let mut runs = 0;
        while let Some(i) = self.pending.pop_first() {
            runs += 1;
            let mut changed = BTreeSet::new();
            let slot = &mut self.slots[i];
            let name = slot.controller.name();
            let started = Instant::now();
            let result = {
                let mut ctx = Ctx {
                    controller: name,
                    inputs: &slot.inputs,
                    outputs: &slot.outputs,
                    state: &mut self.state,
                    changed: &mut changed,
                };
                slot.controller.reconcile(&mut ctx)
            };
            if let Some(o) = &self.observer {
                o.reconciled(name, started.elapsed(), result.as_ref().map(|_| ()));
            }
            match &result {
                Ok(()) => {
                    slot.retry_at = None;
                    slot.backoff = MIN_BACKOFF;
                }
                Err(e) => {
                    tracing::warn!(controller = name, retry_in = ?slot.backoff, "reconcile failed: {e}");
                    slot.retry_at = Some(Instant::now() + slot.backoff);
                    slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
                }
            }
            for (j, s) in self.slots.iter().enumerate() {
                if j != i && s.inputs.iter().any(|k| changed.contains(k)) {
                    self.pending.insert(j);
                }
            }
        }
        runs
    }

    /// Marks `controller` to run at the next [`Runtime::run_until_idle`] (for callers that
    /// drive the runtime themselves). False when no such controller is registered.
    pub fn wake(&mut self, controller: &str) -> bool {
        let Some(i) = self.index_of(controller) else {
            return false;
        };
        self.pending.insert(i);
        true
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.controller.name() == name)
    }

    fn take_signal(&mut self, s: Signal, waiters: &mut Vec<mpsc::Sender<()>>) -> bool {
        match s {
            Signal::Wake(name) => match self.index_of(&name) {
                Some(i) => {
                    self.pending.insert(i);
                }
                None => tracing::warn!("woken controller {name} is not registered"),
            },
            Signal::ResyncAll => self.pending.extend(0..self.slots.len()),
            Signal::WhenIdle(tx) => waiters.push(tx),
            Signal::Stop => return false,
        }
        true
    }

    /// [`Runtime::run`] until `done` holds for the resources of kind `R` under `ids` (once
    /// each exists), or until [`Trigger::stop`]; returns them as they ended.
    pub fn run_to_end<R: Resource>(
        &mut self,
        resync: Duration,
        ids: &[String],
        mut done: impl FnMut(&[&R]) -> bool,
    ) -> Vec<(String, R)> {
        let trigger = self.trigger();
        self.run(resync, resync, |state| {
            let found: Vec<&R> = ids.iter().filter_map(|id| state.get::<R>(id)).collect();
            if found.len() == ids.len() && done(&found) {
                trigger.stop();
            }
        });
        ids.iter()
            .filter_map(|id| Some((id.clone(), self.state.get::<R>(id)?.clone())))
            .collect()
    }

    /// Serves events until [`Trigger::stop`]: outside wake-ups, backoff retries, and a resync
    /// of every controller each `resync`. `tick` runs at least every `tick_every` while the
    /// loop is healthy (the daemon feeds the service watchdog from it).
    pub fn run(&mut self, resync: Duration, tick_every: Duration, mut tick: impl FnMut(&State)) {
        let mut next_resync = Instant::now() + resync;
        let mut waiters: Vec<mpsc::Sender<()>> = Vec::new();
        loop {
            self.run_until_idle();
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
            tick(&self.state);
            let now = Instant::now();
            let mut deadline = next_resync.min(now + tick_every);
            for s in &self.slots {
                if let Some(r) = s.retry_at {
                    deadline = deadline.min(r);
                }
            }
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(now))
            {
                Ok(s) => {
                    if !self.take_signal(s, &mut waiters) {
                        return;
                    }
                    // Coalesce a burst (e.g. many inotify events) into one pass.
                    while let Ok(s) = self.rx.try_recv() {
                        if !self.take_signal(s, &mut waiters) {
                            return;
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            for (i, s) in self.slots.iter_mut().enumerate() {
                if s.retry_at.is_some_and(|r| r <= now) {
                    s.retry_at = None;
                    self.pending.insert(i);
                }
            }
            if now >= next_resync {
                self.pending.extend(0..self.slots.len());
                next_resync = now + resync;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, PartialEq, Debug)]
    struct Input(u32);
    impl Resource for Input {
        const KIND: &'static str = "Input";
    }
    #[derive(Clone, PartialEq, Debug)]
    struct Doubled(u32);
    impl Resource for Doubled {
        const KIND: &'static str = "Doubled";
    }

    /// Writes the outside value into `Input`.
    struct Source(Arc<Mutex<u32>>);
    impl Controller for Source {
        fn name(&self) -> &'static str {
            "source"
        }
        fn inputs(&self) -> Vec<&'static str> {
            vec![]
        }
        fn outputs(&self) -> Vec<&'static str> {
            vec![Input::KIND]
        }
        fn reconcile(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ReconcileError> {
            let v = *self.0.lock().unwrap();
            ctx.put("x", Input(v))?;
            Ok(())
        }
    }

    struct Double {
        runs: Arc<Mutex<u32>>,
        fail_first: bool,
    }
    impl Controller for Double {
        fn name(&self) -> &'static str {
            "double"
        }
        fn inputs(&self) -> Vec<&'static str> {
            vec![Input::KIND]
        }
        fn outputs(&self) -> Vec<&'static str> {
            vec![Doubled::KIND]
        }
        fn reconcile(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ReconcileError> {
            *self.runs.lock().unwrap() += 1;
            if std::mem::take(&mut self.fail_first) {
                return Err("first attempt fails".into());
            }
            if let Some(Input(v)) = ctx.get::<Input>("x")? {
                ctx.put("x", Doubled(v * 2))?;
            }
            Ok(())
        }
    }

    #[test]
    fn changes_cascade_and_equal_writes_go_quiet() {
        let value = Arc::new(Mutex::new(2));
        let runs = Arc::new(Mutex::new(0));
        let mut rt = Runtime::new();
        rt.register(Box::new(Source(value.clone()))).unwrap();
        rt.register(Box::new(Double {
            runs: runs.clone(),
            fail_first: false,
        }))
        .unwrap();
        rt.run_until_idle();
        assert_eq!(rt.state().get::<Doubled>("x"), Some(&Doubled(4)));
        let before = *runs.lock().unwrap();
        // The source rewrites the same value: nothing downstream runs.
        rt.pending.insert(0);
        rt.run_until_idle();
        assert_eq!(*runs.lock().unwrap(), before);
        *value.lock().unwrap() = 5;
        rt.pending.insert(0);
        rt.run_until_idle();
        assert_eq!(rt.state().get::<Doubled>("x"), Some(&Doubled(10)));
    }

    #[test]
    fn one_writer_per_kind_and_declared_access_only() {
        let mut rt = Runtime::new();
        rt.register(Box::new(Source(Arc::default()))).unwrap();
        struct Rogue;
        impl Controller for Rogue {
            fn name(&self) -> &'static str {
                "rogue"
            }
            fn inputs(&self) -> Vec<&'static str> {
                vec![]
            }
            fn outputs(&self) -> Vec<&'static str> {
                vec![Input::KIND]
            }
            fn reconcile(&mut self, _: &mut Ctx<'_>) -> Result<(), ReconcileError> {
                Ok(())
            }
        }
        assert_eq!(
            rt.register(Box::new(Rogue)).unwrap_err(),
            EngineError::SecondWriter {
                kind: "Input",
                first: "source",
                second: "rogue"
            }
        );
        let mut state = State::default();
        let mut changed = BTreeSet::new();
        let mut ctx = Ctx {
            controller: "t",
            inputs: &[],
            outputs: &[],
            state: &mut state,
            changed: &mut changed,
        };
        assert!(ctx.get::<Input>("x").is_err());
        assert!(ctx.put("x", Input(1)).is_err());
    }

    #[test]
    fn failures_retry_with_backoff_in_the_loop() {
        let runs = Arc::new(Mutex::new(0));
        let mut rt = Runtime::new();
        rt.register(Box::new(Source(Arc::new(Mutex::new(1)))))
            .unwrap();
        rt.register(Box::new(Double {
            runs: runs.clone(),
            fail_first: true,
        }))
        .unwrap();
        let trigger = rt.trigger();
        let handle = std::thread::spawn(move || {
            rt.run(Duration::from_secs(3600), Duration::from_millis(50), |_| {});
            rt
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while *runs.lock().unwrap() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(trigger.wake_and_wait("source", Duration::from_secs(10)));
        trigger.stop();
        let rt = handle.join().unwrap();
        assert_eq!(*runs.lock().unwrap(), 2, "one failure, one retry");
        assert_eq!(rt.state().get::<Doubled>("x"), Some(&Doubled(2)));
    }
}
