//! Events about VMs that something may want to react to (`hv.on` in Lua): a registry's
//! [`EventBus`] hands each one to every [`Subscription`].
//!
//! Events are raised on whatever thread notices them (a VM's event thread, for the
//! heartbeat) and only queued there: a subscriber takes them on its own thread when it
//! is ready (the Lua side at its safe points), so nothing runs on a VM's threads on
//! behalf of a subscriber. Each subscription keeps at most [`MAX_QUEUED`] events; when a
//! subscriber falls that far behind, the oldest go and are counted.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use crate::registry::VmId;

/// Most events one subscription holds before the oldest are dropped.
pub const MAX_QUEUED: usize = 1024;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmEventKind {
    /// The guest's agent stopped answering heartbeats (see `crate::agent`).
    HeartbeatLost,
    /// A guest whose heartbeat was lost answered again.
    HeartbeatRestored,
}

impl VmEventKind {
    /// Every kind, in the order documentation lists them.
    pub const ALL: &'static [VmEventKind] =
        &[VmEventKind::HeartbeatLost, VmEventKind::HeartbeatRestored];

    /// The name scripts use: `"heartbeat_lost"`, `"heartbeat_restored"`.
    pub fn name(self) -> &'static str {
        match self {
            VmEventKind::HeartbeatLost => "heartbeat_lost",
            VmEventKind::HeartbeatRestored => "heartbeat_restored",
        }
    }

    pub fn from_name(name: &str) -> Option<VmEventKind> {
        VmEventKind::ALL.iter().copied().find(|k| k.name() == name)
    }
}

/// One event about one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEvent {
    pub kind: VmEventKind,
    pub vm: VmId,
    /// The VM's name when the event was raised.
    pub name: String,
}

/// Where events are raised; one per registry.
#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<Weak<Subscription>>>,
}

impl EventBus {
    pub fn new() -> EventBus {
        EventBus::default()
    }

    /// A new subscription: it gets every event raised from now on, until dropped.
    pub fn subscribe(&self) -> Arc<Subscription> {
        let subscription = Arc::new(Subscription::default());
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers.retain(|s| s.strong_count() > 0);
        subscribers.push(Arc::downgrade(&subscription));
        subscription
    }

    /// Hands `event` to every live subscription.
    pub fn publish(&self, event: VmEvent) {
        let subscribers: Vec<Arc<Subscription>> = {
            let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
            subscribers.retain(|s| s.strong_count() > 0);
            subscribers.iter().filter_map(Weak::upgrade).collect()
        };
        tracing::debug!(vm = event.name, event = event.kind.name(), "vm event");
        for s in subscribers {
            s.push(event.clone());
        }
    }
}

/// One subscriber's queue of events.
#[derive(Default)]
pub struct Subscription {
    queue: Mutex<SubscriptionQueue>,
    arrived: Condvar,
}

#[derive(Default)]
struct SubscriptionQueue {
    events: VecDeque<VmEvent>,
    dropped: u64,
}

impl Subscription {
    fn push(&self, event: VmEvent) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.events.len() >= MAX_QUEUED {
            q.events.pop_front();
            q.dropped += 1;
        }
        q.events.push_back(event);
        drop(q);
        self.arrived.notify_all();
    }

    /// Every event queued so far, oldest first.
    pub fn take_all(&self) -> Vec<VmEvent> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.events.drain(..).collect()
    }

    /// Whether an event is queued.
    pub fn has_events(&self) -> bool {
        !self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .events
            .is_empty()
    }

    /// Waits up to `timeout` for an event to be queued; returns whether one is.
    pub fn wait(&self, timeout: Duration) -> bool {
        let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let (q, _) = self
            .arrived
            .wait_timeout_while(q, timeout, |q| q.events.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        !q.events.is_empty()
    }

    /// Events dropped because the subscriber fell [`MAX_QUEUED`] behind.
    pub fn dropped(&self) -> u64 {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> VmEvent {
        VmEvent {
            kind: VmEventKind::HeartbeatLost,
            vm: VmId(n),
            name: format!("vm{n}"),
        }
    }

    #[test]
    fn every_subscriber_gets_every_event_and_a_dropped_one_nothing() {
        let bus = EventBus::new();
        let a = bus.subscribe();
        let b = bus.subscribe();
        bus.publish(event(1));
        drop(b);
        bus.publish(event(2));
        assert_eq!(a.take_all(), [event(1), event(2)]);
        assert!(a.take_all().is_empty());
        assert!(!a.wait(Duration::from_millis(1)));
        assert_eq!(bus.subscribers.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_subscriber_that_falls_behind_loses_the_oldest() {
        let bus = EventBus::new();
        let a = bus.subscribe();
        for n in 0..MAX_QUEUED as u64 + 3 {
            bus.publish(event(n));
        }
        let got = a.take_all();
        assert_eq!(got.len(), MAX_QUEUED);
        assert_eq!(got[0], event(3));
        assert_eq!(a.dropped(), 3);
        assert_eq!(
            VmEventKind::from_name("heartbeat_lost"),
            Some(VmEventKind::HeartbeatLost)
        );
        assert_eq!(VmEventKind::from_name("nope"), None);
    }
}
