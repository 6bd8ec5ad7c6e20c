//! Acknowledging a device's reading only once the consumer has finished it.
//!
//! rumqttd answers a QoS 1 PUBLISH as soon as its log in memory holds it: a process
//! killed (SIGKILL, power) after that PUBACK and before the consumer stored the reading
//! loses a reading the device was told is safe. In edge mode the front therefore keeps
//! each PUBACK rumqttd sends for a QoS 1 publish on the consumer's filter until the
//! consumer reports that message finished (stored, or dead-lettered): the device resends
//! what was never acknowledged, and the consumer's idempotency by reading id absorbs the
//! copies.
//!
//! The front and the consumer meet on the message itself: the front expects
//! `(topic, payload)` when it passes the PUBLISH on (before rumqttd can log it, so before
//! the consumer can finish it), and the consumer's report of the same bytes settles every
//! expectation of them. Two expectations of the same bytes are the same reading (its id
//! is in the payload, or derived from topic and payload), stored once either copy is: a
//! device that resends on a new connection what its old one had sent waits for whichever
//! copy the consumer finishes first, even when rumqttd never logged the old one (its
//! connection ended first), which settling one expectation per copy would leave waiting
//! forever, and every PUBACK of that device behind it.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use tokio::sync::oneshot;

/// How often expectations of connections that ended are swept away.
const SWEEP: Duration = Duration::from_secs(5);

/// The PUBACKs owed to clients until the consumer finishes their messages. Inert until
/// [`Settlement::set`] names the consumer's filter (before the front takes clients).
#[derive(Debug, Default)]
pub(crate) struct Settlement {
    filter: OnceLock<Vec<String>>,
    hasher: RandomState,
    waiting: Mutex<HashMap<u64, VecDeque<oneshot::Sender<()>>>>,
    /// Messages the consumer finished that some connection waited for.
    settled: AtomicU64,
    /// PUBACKs held until then.
    held: AtomicU64,
}

/// A PUBACK's permission to go: resolves once the consumer finished the message (or the
/// settlement forgot it, which happens only once its connection ended).
pub(crate) type Expected = oneshot::Receiver<()>;

impl Settlement {
    /// Holds PUBACKs of QoS 1 publishes on topics matching `filter` (no `$share`). Once;
    /// false when already set.
    pub(crate) fn set(self: &Arc<Self>, filter: &str) -> bool {
        let set = self
            .filter
            .set(filter.split('/').map(str::to_owned).collect())
            .is_ok();
        if set {
            let this = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SWEEP);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(this) = this.upgrade() else { return };
                    this.sweep();
                }
            });
        }
        set
    }

    /// True once [`Settlement::set`]: every client connection must then be framed.
    pub(crate) fn active(&self) -> bool {
        self.filter.get().is_some()
    }

    fn key(&self, topic: &[u8], payload: &[u8]) -> u64 {
        self.hasher.hash_one((topic, payload))
    }

    /// The permission of a QoS 1 publish's PUBACK, when the consumer will see it; called
    /// before the PUBLISH goes on to rumqttd.
    pub(crate) fn expect(&self, topic: &[u8], payload: &[u8]) -> Option<Expected> {
        let filter = self.filter.get()?;
        if !matches(filter, topic) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let key = self.key(topic, payload);
        self.waiting
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .push_back(tx);
        Some(rx)
    }

    /// The consumer finished a message (`topic`, `payload` as it received them).
    pub(crate) fn finished(&self, topic: &str, payload: &[u8]) {
        if !self.active() {
            return;
        }
        let key = self.key(topic.as_bytes(), payload);
        let Some(queue) = self.waiting.lock().unwrap().remove(&key) else {
            return;
        };
        self.settled
            .fetch_add(queue.len() as u64, Ordering::Relaxed);
        for tx in queue {
            let _ = tx.send(());
        }
    }

    /// Counts a PUBACK the front held.
    pub(crate) fn held(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mqtt_front_acks_held_total").increment(1);
    }

    /// PUBACKs held so far.
    pub(crate) fn holds(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Drops the expectations whose connection ended (their receivers are gone).
    fn sweep(&self) {
        let mut waiting = self.waiting.lock().unwrap();
        waiting.retain(|_, queue| {
            queue.retain(|tx| !tx.is_closed());
            !queue.is_empty()
        });
        metrics::gauge!("mqtt_front_acks_owed").set(waiting.len() as f64);
    }

    #[cfg(test)]
    fn owed(&self) -> usize {
        self.waiting
            .lock()
            .unwrap()
            .values()
            .map(VecDeque::len)
            .sum()
    }
}

/// An MQTT topic filter's levels against a topic (`+` one level, `#` the rest).
fn matches(filter: &[String], topic: &[u8]) -> bool {
    let mut levels = topic.split(|&b| b == b'/');
    for f in filter {
        match f.as_str() {
            "#" => return true,
            "+" => {
                if levels.next().is_none() {
                    return false;
                }
            }
            f => {
                if levels.next() != Some(f.as_bytes()) {
                    return false;
                }
            }
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(f: &str) -> Vec<String> {
        f.split('/').map(str::to_owned).collect()
    }

    #[test]
    fn topic_filters_match_as_mqtt_says() {
        let f = filter("p/clients/+/sensors/+/readings");
        assert!(matches(&f, b"p/clients/a/sensors/b/readings"));
        assert!(!matches(&f, b"p/clients/a/sensors/b/readings/x"));
        assert!(!matches(&f, b"p/clients/a/sensors/b"));
        assert!(!matches(&f, b"q/clients/a/sensors/b/readings"));
        assert!(matches(&filter("a/#"), b"a/b/c"));
        assert!(matches(&filter("+"), b""));
    }

    #[tokio::test]
    async fn a_finished_message_settles_every_expectation_of_its_bytes_only() {
        let s = Arc::new(Settlement::default());
        assert!(
            s.expect(b"c/1/readings", b"{}").is_none(),
            "inert until set"
        );
        assert!(s.set("c/+/readings"));
        assert!(!s.set("c/+/other"));
        assert!(
            s.expect(b"c/1/other", b"{}").is_none(),
            "not the consumer's"
        );

        // The same reading from a connection that ended (its copy maybe never logged)
        // and again from the device's next connection.
        let mut first = s.expect(b"c/1/readings", b"{\"t\":1}").unwrap();
        let mut again = s.expect(b"c/1/readings", b"{\"t\":1}").unwrap();
        let mut other = s.expect(b"c/2/readings", b"{\"t\":1}").unwrap();
        s.finished("c/1/readings", b"{\"t\":2}");
        assert!(first.try_recv().is_err() && other.try_recv().is_err());
        s.finished("c/1/readings", b"{\"t\":1}");
        assert!(first.try_recv().is_ok());
        assert!(
            again.try_recv().is_ok(),
            "the reading is stored: both copies"
        );
        // Sent again after it was stored: waits for its own copy.
        let mut late = s.expect(b"c/1/readings", b"{\"t\":1}").unwrap();
        assert!(late.try_recv().is_err());
        s.finished("c/1/readings", b"{\"t\":1}");
        assert!(late.try_recv().is_ok());
        s.finished("c/1/readings", b"{\"t\":1}"); // a redelivery: nothing waits
        assert!(other.try_recv().is_err());

        // A connection that ended leaves nothing behind.
        drop(other);
        let kept = s.expect(b"c/3/readings", b"x").unwrap();
        s.sweep();
        assert_eq!(s.owed(), 1);
        drop(kept);
        s.sweep();
        assert_eq!(s.owed(), 0);
    }
}
