//! Holding devices back while the consumer is behind.
//!
//! rumqttd keeps each subscription filter's messages in a log of fixed size in memory
//! (`max_segment_count` segments of `max_segment_size` bytes, each message counted as its
//! topic and payload plus 4). The log drops its oldest segment when it is full, whether its subscribers read it
//! or not: a consumer further behind than the log silently loses messages the broker
//! acknowledged ("jumping to head"). A log large enough never to lose is also memory that
//! grows for as long as the node runs (rumqttd keeps what was read until the log is full).
//!
//! So edge mode keeps the log small and stops taking publishes before it can lose one:
//! the front stops reading from its clients while the readings the log took (rumqttd's
//! per-filter meter, pushed every 50 ms) exceed what the consumer finished (stored, or
//! dead-lettered) by half the log. Devices then wait for their PUBACKs, which is MQTT's
//! own flow control; nothing acknowledged is dropped.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How often a held-back connection looks again.
const RECHECK: Duration = Duration::from_millis(5);

/// What the front checks before reading from a client: set once (edge mode) by
/// [`crate::RunningBroker::hold_back`].
#[derive(Debug, Default)]
pub(crate) struct Gate {
    holdback: OnceLock<Holdback>,
    /// Times a connection found the gate shut (after finding it open).
    holds: AtomicU64,
    /// Told every [`RECHECK`] while the gate is open (see [`Gate::announce`]).
    opened: Arc<tokio::sync::Notify>,
}

#[derive(Debug)]
struct Holdback {
    /// The consumer's subscription filter.
    filter: String,
    /// Bytes rumqttd's log of `filter` took (its meter).
    taken: AtomicU64,
    /// Bytes of those the consumer finished.
    finished: Arc<AtomicU64>,
    /// Most unfinished bytes before the front stops reading.
    limit: u64,
}

impl Gate {
    pub(crate) fn set(&self, filter: String, finished: Arc<AtomicU64>, limit: u64) -> bool {
        self.holdback
            .set(Holdback {
                filter,
                taken: AtomicU64::new(0),
                finished,
                limit,
            })
            .is_ok()
    }

    /// Counts what rumqttd's meter says the log of `filter` took.
    pub(crate) fn took(&self, filter: &str, bytes: u64) {
        if let Some(h) = self.holdback.get().filter(|h| h.filter == filter) {
            h.taken.fetch_add(bytes, Ordering::AcqRel);
        }
    }

    /// Bytes the log took that the consumer has not finished.
    pub(crate) fn unfinished(&self) -> u64 {
        self.holdback.get().map_or(0, |h| {
            h.taken
                .load(Ordering::Acquire)
                .saturating_sub(h.finished.load(Ordering::Acquire))
        })
    }

    fn open(&self) -> bool {
        self.holdback
            .get()
            .is_none_or(|h| self.unfinished() < h.limit)
    }

    /// Wakes held-back connections whenever the gate is open, for as long as the front
    /// lives: one timer for all of them.
    pub(crate) async fn announce(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.open() {
                self.opened.notify_waiters();
            }
        }
    }

    pub(crate) fn holds(&self) -> u64 {
        self.holds.load(Ordering::Relaxed)
    }
}

/// A client's stream that is not read from while the gate is shut.
pub(crate) struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
    /// While held back: the gate's next word that it is open.
    held: Option<Pin<Box<tokio::sync::futures::OwnedNotified>>>,
}

impl<S> Gated<S> {
    pub(crate) fn new(inner: S, gate: Arc<Gate>) -> Self {
        Self {
            inner,
            gate,
            held: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(held) = &mut this.held {
                if held.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            if this.gate.open() {
                this.held = None;
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if this.held.is_none() {
                this.gate.holds.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("mqtt_front_held_back_total").increment(1);
            }
            // Waiting before looking again: an opening between the look and the wait
            // is announced again at the next tick.
            let mut next = Box::pin(this.gate.opened.clone().notified_owned());
            next.as_mut().enable();
            this.held = Some(next);
            if this.gate.open() {
                this.held = None;
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
