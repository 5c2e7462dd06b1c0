//! The node's event bus: typed events with dotted names, delivered to handlers and streams
//! whose filters match.
//!
//! A node publishes what happens to it (`entity.changed`, `peer.connected`, ...) here, and
//! the WebSocket API, the CLI's live verbs and library integrations subscribe. Integrations
//! may publish their own events too.
//!
//! - **Handlers** run on the publishing task, highest priority first. An error or a panic
//!   in one is caught, recorded in the dead-letter queue, and the others still run; keep
//!   them quick, since the publisher waits for them.
//! - **Streams** get their own bounded queue. A stream that falls a whole queue behind is
//!   closed (and told so) rather than letting memory grow or slowing everyone else down.
//! - **Middleware** runs before handlers (it may enrich or drop an event) and after them
//!   (it sees the event as delivered).
//! - A bounded **history** of recent events can be queried by pattern, and **stats** count
//!   events per name and time the handlers.
//!
//! ```
//! # async fn run() -> Result<(), hearth::Error> {
//! use hearth::bus::{Bus, Event, Filter, Source};
//! let bus = Bus::new();
//! let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
//! let count = seen.clone();
//! bus.subscribe(Filter::new("entity.*")?, move |_event: &Event| {
//!     count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
//!     Ok(())
//! });
//! let source = Source { home: "home".into(), device: "device".into() };
//! bus.publish(Event::new("entity.changed", "light.porch", serde_json::json!({}), source))?;
//! assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), 1);
//! # Ok(()) }
//! ```

pub(crate) mod bridge;
mod pattern;
mod stats;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc};

pub use pattern::{MAX_NAME_LEN, Pattern};
pub use stats::{BusStats, HandlerStats, NameStats};

use crate::Error;

/// Events kept in the history.
pub const HISTORY_CAPACITY: usize = 1024;
/// Failed deliveries kept in the dead-letter queue; the oldest go first.
pub const DEAD_LETTER_CAPACITY: usize = 256;
/// Queue length of a stream made with [`Bus::stream`] when the caller has no better figure.
pub const DEFAULT_STREAM_CAPACITY: usize = 256;
/// Event names counted separately in [`BusStats`]; names beyond this share one bucket, so a
/// publisher inventing names cannot grow the stats without bound.
pub const MAX_STATS_NAMES: usize = 512;
/// The bucket for names past [`MAX_STATS_NAMES`].
pub const OTHER_NAMES: &str = "(other)";
/// Longest correlation id an event carries; the same cap applies on the wire.
pub const MAX_CORRELATION_ID_LEN: usize = hearth_crdt::wire::MAX_CORRELATION_ID_LEN;
/// The event the node publishes when its bridge from the node's event stream fell behind
/// and lost events: `data.count` says how many (of every name, so some may not have
/// matched a given subscription). It comes in order, where the gap is; WebSocket sessions receive it as a
/// `missed` frame whatever they subscribed to.
pub const MISSED_EVENT: &str = "events.missed";
/// The event the bus publishes when a handler (or middleware) fails: `subject` is the
/// handler's label (or subscription id), `data` holds `error`, `handler`, `subscription`,
/// `panicked` and the failed event's `event_name` and `event_subject`; the failed event's
/// source and correlation id are kept. A failure while handling this event itself
/// publishes nothing more, so failures cannot feed on one another.
pub const ERROR_EVENT: &str = "error.occurred";

/// Seed 000's name for one of the node's own events, which the node also publishes under
/// it (with `metadata.alias_of`): `device.connect`, `device.disconnect` and
/// `device.state_change` for `peer.connected`, `peer.disconnected` and `entity.changed`.
pub fn alias_of(name: &str) -> Option<&'static str> {
    match name {
        "peer.connected" => Some("device.connect"),
        "peer.disconnected" => Some("device.disconnect"),
        "entity.changed" => Some("device.state_change"),
        _ => None,
    }
}

/// Queue length of the stream behind [`Bus::wait_for`]; only the first event matters.
const WAIT_FOR_CAPACITY: usize = 4;

/// Where an event comes from: the home and device that caused it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// HomeId.
    pub home: String,
    /// The device's PeerId (or, for a writer this node cannot name, its actor id in hex).
    pub device: String,
}

/// An event: `{name, subject, data, source, correlation_id, time, metadata}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `<area>.<action>`, e.g. `entity.changed`.
    pub name: String,
    /// What the event concerns: an entity id, room id, user or device.
    pub subject: String,
    /// The event's payload.
    pub data: Value,
    /// Who caused it.
    pub source: Source,
    /// The id the originating request carried, if any, so a caller can match its own
    /// writes among the events they cause (on any node of the home).
    pub correlation_id: Option<String>,
    /// When it was published, in Unix seconds.
    pub time: f64,
    /// Free-form annotations; middleware may add to them.
    pub metadata: Map<String, Value>,
}

impl Event {
    /// A new event stamped with the current time, without correlation id or metadata.
    pub fn new(
        name: impl Into<String>,
        subject: impl Into<String>,
        data: Value,
        source: Source,
    ) -> Self {
        Self {
            name: name.into(),
            subject: subject.into(),
            data,
            source,
            correlation_id: None,
            time: unix_now(),
            metadata: Map::new(),
        }
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: Option<String>) -> Self {
        self.correlation_id = id;
        self
    }

    /// Adds one metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: Value) -> Self {
        self.metadata.insert(key.into(), value);
        self
    }
}

/// The current time in Unix seconds (0 before 1970).
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

type Predicate = Arc<dyn Fn(&Event) -> bool + Send + Sync>;

/// Which events a subscription receives: any of its patterns must match the name, the
/// subject must be in the subject list when there is one, and the predicate (if any) must
/// accept the event.
#[derive(Clone)]
pub struct Filter {
    patterns: Vec<Pattern>,
    subjects: Option<HashSet<String>>,
    predicate: Option<Predicate>,
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filter")
            .field("patterns", &self.patterns)
            .field("subjects", &self.subjects)
            .field("predicate", &self.predicate.is_some())
            .finish()
    }
}

impl Filter {
    /// Events whose name matches `pattern`.
    pub fn new(pattern: &str) -> Result<Self, Error> {
        Ok(Self::from_pattern(Pattern::parse(pattern)?))
    }

    /// Events whose name matches `pattern`.
    pub fn from_pattern(pattern: Pattern) -> Self {
        Self {
            patterns: vec![pattern],
            subjects: None,
            predicate: None,
        }
    }

    /// Every event.
    pub fn all() -> Self {
        Self::from_pattern(Pattern::all())
    }

    /// No event at all (until patterns are added): a subscription that waits to be told
    /// what it wants.
    pub fn nothing() -> Self {
        Self {
            patterns: Vec::new(),
            subjects: None,
            predicate: None,
        }
    }

    /// Also accepts names matching `pattern`.
    pub fn or_pattern(mut self, pattern: Pattern) -> Self {
        self.patterns.push(pattern);
        self
    }

    /// Only events about one of these subjects.
    pub fn subjects<S: Into<String>>(mut self, subjects: impl IntoIterator<Item = S>) -> Self {
        self.subjects = Some(subjects.into_iter().map(Into::into).collect());
        self
    }

    /// Only events the predicate accepts. It runs on the publishing task for every event
    /// whose name and subject already matched; a panic in it counts as "no".
    pub fn predicate(mut self, f: impl Fn(&Event) -> bool + Send + Sync + 'static) -> Self {
        self.predicate = Some(Arc::new(f));
        self
    }

    /// Whether `event` passes.
    pub fn matches(&self, event: &Event) -> bool {
        if !self.patterns.iter().any(|p| p.matches(&event.name)) {
            return false;
        }
        if let Some(subjects) = &self.subjects
            && !subjects.contains(&event.subject)
        {
            return false;
        }
        match &self.predicate {
            Some(p) => catch_unwind(AssertUnwindSafe(|| p(event))).unwrap_or(false),
            None => true,
        }
    }
}

/// Identifies a subscription, for [`Bus::unsubscribe`] and in dead letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SubscriptionId(pub u64);

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sub-{}", self.0)
    }
}

/// How a handler subscription behaves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Higher runs first; equal priorities run in subscription order.
    pub priority: i32,
    /// Remove the subscription after its first delivery.
    pub once: bool,
    /// A name for logs and dead letters.
    pub label: Option<String>,
}

/// What a handler returns; an `Err` lands in the dead-letter queue.
pub type HandlerResult = Result<(), String>;

type HandlerFn = dyn Fn(&Event) -> HandlerResult + Send + Sync;
type PreFn = dyn Fn(Event) -> Option<Event> + Send + Sync;
type PostFn = dyn Fn(&Event) + Send + Sync;

/// A delivery that failed: the handler returned an error or panicked.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeadLetter {
    /// The event as the handler received it.
    pub event: Event,
    /// The subscription whose handler failed.
    pub subscription: SubscriptionId,
    /// Its label, if it had one.
    pub label: Option<String>,
    /// The error, or the panic message.
    pub error: String,
    /// Whether the handler panicked (rather than returning an error).
    pub panicked: bool,
    /// When it failed, in Unix seconds.
    pub time: f64,
}

/// What [`Bus::publish`] did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// Delivered to this many subscriptions (handlers and streams).
    Delivered(usize),
    /// A pre-middleware dropped it.
    Dropped,
}

enum Target {
    Handler(Arc<HandlerFn>),
    Stream {
        tx: mpsc::Sender<Event>,
        signal: Arc<StreamSignal>,
    },
}

impl Clone for Target {
    fn clone(&self) -> Self {
        match self {
            Target::Handler(h) => Target::Handler(h.clone()),
            Target::Stream { tx, signal } => Target::Stream {
                tx: tx.clone(),
                signal: signal.clone(),
            },
        }
    }
}

/// Tells a stream's reader that the bus gave up on it.
#[derive(Default)]
struct StreamSignal {
    overflowed: AtomicBool,
    notify: Notify,
}

struct Sub {
    id: SubscriptionId,
    filter: Filter,
    priority: i32,
    once: bool,
    label: Option<String>,
    target: Target,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Kept sorted: priority descending, then id ascending.
    subs: Vec<Arc<Sub>>,
    pre: Vec<Arc<PreFn>>,
    post: Vec<Arc<PostFn>>,
    history: VecDeque<Event>,
    dead: VecDeque<DeadLetter>,
    stats: BusStats,
    /// Per handler subscription, while it lives.
    handlers: BTreeMap<SubscriptionId, HandlerStats>,
}

struct Inner {
    // A std mutex: it is held only for short, non-async bookkeeping, never while user code
    // (handlers, filters, middleware) runs, so a slow or re-entrant handler cannot deadlock
    // the bus.
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic never happens while the lock is held (user code runs outside it), so a
        // poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove(&self, id: SubscriptionId) -> bool {
        let mut state = self.lock();
        let before = state.subs.len();
        state.subs.retain(|s| s.id != id);
        state.handlers.remove(&id);
        state.stats.subscriptions = state.subs.len();
        state.subs.len() != before
    }
}

/// The event bus. Cheap to clone; clones share subscriptions, history and stats.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("Bus")
            .field("subscriptions", &state.subs.len())
            .field("history", &state.history.len())
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Calls `handler` for every matching event, at priority 0.
    pub fn subscribe(
        &self,
        filter: Filter,
        handler: impl Fn(&Event) -> HandlerResult + Send + Sync + 'static,
    ) -> SubscriptionId {
        self.subscribe_with(filter, SubscribeOptions::default(), handler)
    }

    /// Calls `handler` for the first matching event only.
    pub fn once(
        &self,
        filter: Filter,
        handler: impl Fn(&Event) -> HandlerResult + Send + Sync + 'static,
    ) -> SubscriptionId {
        let options = SubscribeOptions {
            once: true,
            ..SubscribeOptions::default()
        };
        self.subscribe_with(filter, options, handler)
    }

    /// Calls `handler` for matching events, with a priority, `once` and a label.
    pub fn subscribe_with(
        &self,
        filter: Filter,
        options: SubscribeOptions,
        handler: impl Fn(&Event) -> HandlerResult + Send + Sync + 'static,
    ) -> SubscriptionId {
        self.add(filter, options, Target::Handler(Arc::new(handler)))
    }

    /// A stream of matching events with its own queue of `capacity` (at least 1). When the
    /// reader falls `capacity` events behind, the bus closes the stream: the reader gets
    /// what was queued, then `None`, and [`EventStream::overflowed`] says why.
    pub fn stream(&self, filter: Filter, capacity: usize) -> EventStream {
        self.stream_with(filter, 0, capacity)
    }

    /// [`Bus::stream`] at a priority (higher is served first).
    pub fn stream_with(&self, filter: Filter, priority: i32, capacity: usize) -> EventStream {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let signal = Arc::new(StreamSignal::default());
        let options = SubscribeOptions {
            priority,
            ..SubscribeOptions::default()
        };
        let id = self.add(
            filter,
            options,
            Target::Stream {
                tx,
                signal: signal.clone(),
            },
        );
        EventStream {
            id,
            rx,
            signal,
            bus: Arc::downgrade(&self.inner),
        }
    }

    fn add(&self, filter: Filter, options: SubscribeOptions, target: Target) -> SubscriptionId {
        let mut state = self.inner.lock();
        state.next_id += 1;
        let id = SubscriptionId(state.next_id);
        if matches!(target, Target::Handler(_)) {
            let stats = HandlerStats {
                subscription: id,
                label: options.label.clone(),
                priority: options.priority,
                calls: 0,
                errors: 0,
                panics: 0,
                total_time: Duration::ZERO,
                max_time: Duration::ZERO,
            };
            state.handlers.insert(id, stats);
        }
        let sub = Arc::new(Sub {
            id,
            filter,
            priority: options.priority,
            once: options.once,
            label: options.label,
            target,
        });
        // Insert after every subscription of higher or equal priority: stable order.
        let at = state
            .subs
            .iter()
            .position(|s| s.priority < sub.priority)
            .unwrap_or(state.subs.len());
        state.subs.insert(at, sub);
        state.stats.subscriptions = state.subs.len();
        id
    }

    /// Removes a subscription; `false` if it was already gone.
    pub fn unsubscribe(&self, id: SubscriptionId) -> bool {
        self.inner.remove(id)
    }

    /// Waits up to `timeout` for the next event whose name matches `pattern`; `Ok(None)`
    /// on timeout. The subscription starts when this is called, not when the future is
    /// first polled, so an event published in between is not missed.
    ///
    /// Cancel-safe: dropping the future removes the subscription.
    pub fn wait_for(
        &self,
        pattern: &str,
        timeout: Duration,
    ) -> Result<impl Future<Output = Option<Event>> + Send + 'static, Error> {
        let mut stream = self.stream(Filter::new(pattern)?, WAIT_FOR_CAPACITY);
        Ok(async move {
            tokio::time::timeout(timeout, stream.recv())
                .await
                .ok()
                .flatten()
        })
    }

    /// Adds a pre-middleware: it sees every event before any handler, and returns it
    /// (possibly enriched) or `None` to drop it. Middleware runs in the order added.
    pub fn pre(&self, middleware: impl Fn(Event) -> Option<Event> + Send + Sync + 'static) {
        self.inner.lock().pre.push(Arc::new(middleware));
    }

    /// Adds a post-middleware: it sees every delivered event after the handlers ran.
    pub fn post(&self, middleware: impl Fn(&Event) + Send + Sync + 'static) {
        self.inner.lock().post.push(Arc::new(middleware));
    }

    /// Publishes an event: pre-middleware, then matching handlers and streams by
    /// priority, then post-middleware, then the history and stats.
    ///
    /// Fails only for a malformed event name, or a correlation id longer than
    /// [`MAX_CORRELATION_ID_LEN`]. Handler failures never fail the publish; they go to the
    /// dead-letter queue.
    pub fn publish(&self, event: Event) -> Result<Published, Error> {
        if let Err(e) = check_event(&event) {
            self.inner.lock().stats.refused += 1;
            return Err(e);
        }
        let pre = self.inner.lock().pre.clone();
        let mut event = event;
        for middleware in pre {
            let before = event.clone();
            match catch_unwind(AssertUnwindSafe(|| middleware(event))) {
                Ok(Some(next)) => event = next,
                Ok(None) => {
                    self.inner.lock().stats.dropped_by_middleware += 1;
                    return Ok(Published::Dropped);
                }
                Err(panic) => {
                    // A broken middleware must not silence the bus: pass the event on as
                    // it was, and record the failure.
                    tracing::warn!(name = %before.name, "event middleware panicked");
                    event = before;
                    self.dead_letter(DeadLetter {
                        event: event.clone(),
                        subscription: SubscriptionId(0),
                        label: Some("pre-middleware".into()),
                        error: panic_text(&*panic),
                        panicked: true,
                        time: unix_now(),
                    });
                }
            }
        }
        if check_event(&event).is_err() {
            // Middleware broke the name; publishing it would poison pattern matching.
            self.inner.lock().stats.refused += 1;
            return Err(Error::Invalid(format!(
                "middleware turned the event into one with a malformed name ({:?})",
                event.name
            )));
        }

        let subs: Vec<Arc<Sub>> = self.inner.lock().subs.clone();
        let mut delivered = 0usize;
        let mut failures = Vec::new();
        let mut handler_time = Duration::ZERO;
        let mut handler_max = Duration::ZERO;
        let mut errors = 0u64;
        let mut panics = 0u64;
        // (subscription, time taken, error, panic) per handler call.
        let mut calls: Vec<(SubscriptionId, Duration, bool, bool)> = Vec::new();
        for sub in subs {
            if !sub.filter.matches(&event) {
                continue;
            }
            // A `once` subscription fires for whichever publish removes it first.
            if sub.once && !self.inner.remove(sub.id) {
                continue;
            }
            match &sub.target {
                Target::Handler(handler) => {
                    let started = Instant::now();
                    let outcome = catch_unwind(AssertUnwindSafe(|| handler(&event)));
                    let took = started.elapsed();
                    handler_time += took;
                    handler_max = handler_max.max(took);
                    delivered += 1;
                    let failure = match outcome {
                        Ok(Ok(())) => None,
                        Ok(Err(error)) => {
                            errors += 1;
                            Some((error, false))
                        }
                        Err(panic) => {
                            panics += 1;
                            Some((panic_text(&*panic), true))
                        }
                    };
                    calls.push((
                        sub.id,
                        took,
                        matches!(failure, Some((_, false))),
                        matches!(failure, Some((_, true))),
                    ));
                    if let Some((error, panicked)) = failure {
                        tracing::debug!(subscription = %sub.id, %error, panicked, "event handler failed");
                        failures.push(DeadLetter {
                            event: event.clone(),
                            subscription: sub.id,
                            label: sub.label.clone(),
                            error,
                            panicked,
                            time: unix_now(),
                        });
                    }
                }
                Target::Stream { tx, signal } => match tx.try_send(event.clone()) {
                    Ok(()) => delivered += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        // Dropping the sender (by removing the subscription) ends the
                        // stream after what it already holds; memory stays bounded.
                        signal.overflowed.store(true, Ordering::Release);
                        signal.notify.notify_waiters();
                        if self.inner.remove(sub.id) {
                            self.inner.lock().stats.streams_overflowed += 1;
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.inner.remove(sub.id);
                    }
                },
            }
        }

        let post = self.inner.lock().post.clone();
        for middleware in post {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| middleware(&event))) {
                failures.push(DeadLetter {
                    event: event.clone(),
                    subscription: SubscriptionId(0),
                    label: Some("post-middleware".into()),
                    error: panic_text(&*panic),
                    panicked: true,
                    time: unix_now(),
                });
            }
        }

        let mut state = self.inner.lock();
        for (id, took, error, panic) in calls {
            // A `once` handler is gone by now; its call still counts in the totals.
            if let Some(h) = state.handlers.get_mut(&id) {
                h.calls += 1;
                h.errors += u64::from(error);
                h.panics += u64::from(panic);
                h.total_time += took;
                h.max_time = h.max_time.max(took);
            }
        }
        let reports: Vec<Event> = if event.name == ERROR_EVENT {
            Vec::new()
        } else {
            failures.iter().map(error_event).collect()
        };
        for failure in failures {
            push_bounded(&mut state.dead, failure, DEAD_LETTER_CAPACITY);
        }
        state.stats.published += 1;
        let known = state.stats.by_name.contains_key(&event.name);
        let key = if known || state.stats.by_name.len() < MAX_STATS_NAMES {
            event.name.clone()
        } else {
            OTHER_NAMES.to_string()
        };
        let entry = state.stats.by_name.entry(key).or_default();
        entry.published += 1;
        entry.delivered += delivered as u64;
        entry.handler_errors += errors;
        entry.handler_panics += panics;
        entry.handler_time += handler_time;
        entry.handler_time_max = entry.handler_time_max.max(handler_max);
        push_bounded(&mut state.history, event, HISTORY_CAPACITY);
        drop(state);
        for report in reports {
            if let Err(error) = self.publish(report) {
                tracing::debug!(%error, "could not report a failed handler");
            }
        }
        Ok(Published::Delivered(delivered))
    }

    fn dead_letter(&self, letter: DeadLetter) {
        push_bounded(&mut self.inner.lock().dead, letter, DEAD_LETTER_CAPACITY);
    }

    /// Recent events whose name matches `pattern`, oldest first, at most `limit` (the most
    /// recent ones). The history holds the last [`HISTORY_CAPACITY`] events.
    pub fn history(&self, pattern: &Pattern, limit: usize) -> Vec<Event> {
        let state = self.inner.lock();
        let mut out: Vec<Event> = state
            .history
            .iter()
            .rev()
            .filter(|e| pattern.matches(&e.name))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// The failed deliveries kept, oldest first (at most [`DEAD_LETTER_CAPACITY`]).
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.inner.lock().dead.iter().cloned().collect()
    }

    /// Removes and returns the dead letters, e.g. to retry or report them.
    pub fn drain_dead_letters(&self) -> Vec<DeadLetter> {
        self.inner.lock().dead.drain(..).collect()
    }

    /// Counters since the bus was made, with the live handlers' own in priority order.
    pub fn stats(&self) -> BusStats {
        let state = self.inner.lock();
        let mut stats = state.stats.clone();
        stats.handlers = state
            .subs
            .iter()
            .filter_map(|s| state.handlers.get(&s.id).cloned())
            .collect();
        stats
    }
}

/// The `error.occurred` event for a failed delivery.
fn error_event(failure: &DeadLetter) -> Event {
    let handler = failure
        .label
        .clone()
        .unwrap_or_else(|| failure.subscription.to_string());
    let data = serde_json::json!({
        "error": failure.error,
        "handler": handler,
        "subscription": failure.subscription.0,
        "panicked": failure.panicked,
        "event_name": failure.event.name,
        "event_subject": failure.event.subject,
    });
    Event::new(ERROR_EVENT, handler, data, failure.event.source.clone())
        .with_correlation_id(failure.event.correlation_id.clone())
}

fn check_event(event: &Event) -> Result<(), Error> {
    pattern::validate_name(&event.name)?;
    if let Some(c) = &event.correlation_id
        && c.len() > MAX_CORRELATION_ID_LEN
    {
        return Err(Error::Invalid(format!(
            "correlation id is {} bytes; at most {MAX_CORRELATION_ID_LEN} are allowed",
            c.len()
        )));
    }
    Ok(())
}

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, cap: usize) {
    if queue.len() >= cap {
        queue.pop_front();
    }
    queue.push_back(item);
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_string()
    }
}

/// A subscription's own queue of events; see [`Bus::stream`]. Dropping it unsubscribes.
pub struct EventStream {
    id: SubscriptionId,
    rx: mpsc::Receiver<Event>,
    signal: Arc<StreamSignal>,
    bus: Weak<Inner>,
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStream").field("id", &self.id).finish()
    }
}

impl EventStream {
    /// The next event; `None` once the bus is gone or has closed this stream for falling
    /// behind (see [`EventStream::overflowed`]).
    ///
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Whether the bus closed this stream because its queue was full.
    pub fn overflowed(&self) -> bool {
        self.signal.overflowed.load(Ordering::Acquire)
    }

    /// Resolves as soon as the bus closes this stream for falling behind, even while
    /// events are still queued; lets a reader stop at once instead of draining first.
    ///
    /// Cancel-safe.
    pub async fn wait_overflow(&self) {
        self.overflow_watch().wait().await
    }

    /// A handle that tells when this stream overflows, usable while the stream itself is
    /// borrowed for reading.
    pub fn overflow_watch(&self) -> OverflowWatch {
        OverflowWatch {
            signal: self.signal.clone(),
        }
    }

    /// The subscription's id.
    pub fn id(&self) -> SubscriptionId {
        self.id
    }
}

/// Tells when the bus closed a stream for falling behind; see
/// [`EventStream::overflow_watch`].
#[derive(Clone)]
pub struct OverflowWatch {
    signal: Arc<StreamSignal>,
}

impl fmt::Debug for OverflowWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OverflowWatch")
            .field("overflowed", &self.overflowed())
            .finish()
    }
}

impl OverflowWatch {
    /// Whether the stream has overflowed.
    pub fn overflowed(&self) -> bool {
        self.signal.overflowed.load(Ordering::Acquire)
    }

    /// Resolves once the stream has overflowed.
    ///
    /// Cancel-safe.
    pub async fn wait(&self) {
        loop {
            let notified = self.signal.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a notification in between is not lost.
            notified.as_mut().enable();
            if self.overflowed() {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            inner.remove(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn source() -> Source {
        Source {
            home: "home".into(),
            device: "device".into(),
        }
    }

    fn ev(name: &str, subject: &str) -> Event {
        Event::new(name, subject, serde_json::json!({}), source())
    }

    fn recorder(bus: &Bus, filter: Filter, log: &Arc<Mutex<Vec<String>>>, tag: &str) {
        let log = log.clone();
        let tag = tag.to_string();
        bus.subscribe(filter, move |e| {
            log.lock().unwrap().push(format!("{tag}:{}", e.name));
            Ok(())
        });
    }

    #[test]
    fn wildcards_route_events_to_matching_handlers_only() {
        let bus = Bus::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        recorder(&bus, Filter::new("entity.*").unwrap(), &log, "entity");
        recorder(&bus, Filter::new("room.**").unwrap(), &log, "room");
        recorder(&bus, Filter::new("*").unwrap(), &log, "all");
        bus.publish(ev("entity.changed", "light.porch")).unwrap();
        bus.publish(ev("room.chat", "r1")).unwrap();
        bus.publish(ev("peer.connected", "p")).unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            [
                "entity:entity.changed",
                "all:entity.changed",
                "room:room.chat",
                "all:room.chat",
                "all:peer.connected"
            ]
        );
    }

    #[test]
    fn higher_priority_handlers_run_first_and_ties_keep_subscription_order() {
        let bus = Bus::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        for (priority, tag) in [(0, "low-a"), (10, "high"), (0, "low-b"), (-5, "last")] {
            let log = log.clone();
            let options = SubscribeOptions {
                priority,
                ..SubscribeOptions::default()
            };
            bus.subscribe_with(Filter::all(), options, move |_| {
                log.lock().unwrap().push(tag);
                Ok(())
            });
        }
        bus.publish(ev("entity.changed", "x.y")).unwrap();
        assert_eq!(*log.lock().unwrap(), ["high", "low-a", "low-b", "last"]);
    }

    #[test]
    fn subjects_and_predicates_narrow_a_filter() {
        let bus = Bus::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        recorder(
            &bus,
            Filter::new("entity.*")
                .unwrap()
                .subjects(["light.porch", "light.hall"]),
            &log,
            "subjects",
        );
        recorder(
            &bus,
            Filter::all().predicate(|e| e.data.get("important").is_some()),
            &log,
            "predicate",
        );
        recorder(
            &bus,
            Filter::all().predicate(|_| panic!("broken predicate")),
            &log,
            "never",
        );
        bus.publish(ev("entity.changed", "light.porch")).unwrap();
        bus.publish(ev("entity.changed", "light.garage")).unwrap();
        bus.publish(Event::new(
            "room.chat",
            "r",
            serde_json::json!({"important": true}),
            source(),
        ))
        .unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            ["subjects:entity.changed", "predicate:room.chat"]
        );
    }

    #[test]
    fn a_once_handler_fires_exactly_once() {
        let bus = Bus::new();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        bus.once(Filter::new("entity.*").unwrap(), move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        bus.publish(ev("room.chat", "r")).unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 0);
        for _ in 0..3 {
            bus.publish(ev("entity.changed", "a.b")).unwrap();
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert_eq!(bus.stats().subscriptions, 0);
    }

    #[test]
    fn a_panicking_or_failing_handler_lands_in_the_dead_letters_and_others_still_run() {
        let bus = Bus::new();
        let count = Arc::new(AtomicUsize::new(0));
        let options = |priority, label: &str| SubscribeOptions {
            priority,
            label: Some(label.into()),
            ..SubscribeOptions::default()
        };
        // On `entity.*` only: a handler of every event would also fail on the
        // `error.occurred` events that these failures raise.
        let entity = || Filter::new("entity.*").unwrap();
        bus.subscribe_with(entity(), options(2, "panics"), |_| {
            panic!("handler exploded")
        });
        bus.subscribe_with(entity(), options(1, "fails"), |_| Err("no luck".into()));
        let c = count.clone();
        bus.subscribe(entity(), move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        let published = bus.publish(ev("entity.changed", "a.b")).unwrap();
        assert_eq!(published, Published::Delivered(3));
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let dead = bus.dead_letters();
        assert_eq!(dead.len(), 2);
        assert!(dead[0].panicked);
        assert_eq!(dead[0].label.as_deref(), Some("panics"));
        assert!(
            dead[0].error.contains("handler exploded"),
            "{}",
            dead[0].error
        );
        assert!(!dead[1].panicked);
        assert_eq!(dead[1].error, "no luck");
        assert_eq!(dead[1].event.subject, "a.b");
        let stats = bus.stats();
        let name = &stats.by_name["entity.changed"];
        assert_eq!((name.handler_errors, name.handler_panics), (1, 1));
        assert_eq!(bus.drain_dead_letters().len(), 2);
        assert!(bus.dead_letters().is_empty());
    }

    #[test]
    fn a_failing_handler_raises_error_occurred_once_with_the_correlation_id() {
        let bus = Bus::new();
        let options = SubscribeOptions {
            label: Some("thermostat".into()),
            ..SubscribeOptions::default()
        };
        bus.subscribe_with(Filter::new("coordination.*").unwrap(), options, |_| {
            Err("sensor offline".into())
        });
        let mut errors = bus.stream(Filter::new(ERROR_EVENT).unwrap(), 8);
        // A handler that fails on the error events themselves raises no more of them.
        bus.subscribe(Filter::new(ERROR_EVENT).unwrap(), |_| {
            Err("also broken".into())
        });
        bus.publish(
            ev("coordination.broadcast", "dev-1").with_correlation_id(Some("req-5".into())),
        )
        .unwrap();
        let report = errors.try_recv().expect("no error.occurred");
        assert_eq!(report.subject, "thermostat");
        assert_eq!(report.data["error"], "sensor offline");
        assert_eq!(report.data["handler"], "thermostat");
        assert_eq!(report.data["event_name"], "coordination.broadcast");
        assert_eq!(report.data["panicked"], false);
        assert_eq!(report.correlation_id.as_deref(), Some("req-5"));
        assert!(errors.try_recv().is_none(), "an error about an error");
        // Both failures are dead letters: the handler's and the error handler's.
        assert_eq!(bus.dead_letters().len(), 2);
    }

    #[test]
    fn stats_are_kept_per_handler() {
        let bus = Bus::new();
        let labelled = |label: &str, priority| SubscribeOptions {
            label: Some(label.into()),
            priority,
            ..SubscribeOptions::default()
        };
        let slow = bus.subscribe_with(Filter::all(), labelled("slow", 1), |_| {
            std::thread::sleep(Duration::from_millis(2));
            Ok(())
        });
        bus.subscribe_with(Filter::new("room.*").unwrap(), labelled("flaky", 0), |e| {
            if e.subject == "bad" {
                panic!("boom")
            }
            Err("nope".into())
        });
        let _stream = bus.stream(Filter::all(), 16);
        bus.publish(ev("entity.changed", "a.b")).unwrap();
        bus.publish(ev("room.chat", "r")).unwrap();
        bus.publish(ev("room.chat", "bad")).unwrap();
        let stats = bus.stats();
        // Handlers only, in priority order; the stream is not one.
        let labels: Vec<_> = stats.handlers.iter().map(|h| h.label.as_deref()).collect();
        assert_eq!(labels, [Some("slow"), Some("flaky")]);
        let (s, f) = (&stats.handlers[0], &stats.handlers[1]);
        // Three events, and the two `error.occurred` that the flaky handler raised.
        assert_eq!((s.calls, s.errors, s.panics), (5, 0, 0));
        assert!(s.total_time >= Duration::from_millis(10));
        assert!(s.max_time >= Duration::from_millis(2));
        assert!(s.average_time() >= Duration::from_millis(2));
        assert_eq!((f.calls, f.errors, f.panics), (2, 1, 1));
        // A removed handler's row goes with it.
        bus.unsubscribe(slow);
        assert_eq!(bus.stats().handlers.len(), 1);
    }

    #[test]
    fn seed_000_names_alias_the_node_events() {
        assert_eq!(alias_of("peer.connected"), Some("device.connect"));
        assert_eq!(alias_of("peer.disconnected"), Some("device.disconnect"));
        assert_eq!(alias_of("entity.changed"), Some("device.state_change"));
        assert_eq!(alias_of("room.chat"), None);
    }

    #[test]
    fn the_dead_letter_queue_is_bounded() {
        let bus = Bus::new();
        bus.subscribe(Filter::new("a.b").unwrap(), |e| Err(e.subject.clone()));
        for i in 0..DEAD_LETTER_CAPACITY + 10 {
            bus.publish(ev("a.b", &format!("s{i}"))).unwrap();
        }
        let dead = bus.dead_letters();
        assert_eq!(dead.len(), DEAD_LETTER_CAPACITY);
        assert_eq!(dead[0].error, "s10");
    }

    #[test]
    fn middleware_enriches_every_event_drops_some_and_sees_them_after_handlers() {
        let bus = Bus::new();
        bus.pre(|e| {
            (e.subject != "secret.thing").then(|| e.with_metadata("seen_by", "pre".into()))
        });
        let handled = Arc::new(Mutex::new(Vec::new()));
        let h = handled.clone();
        bus.subscribe(Filter::all(), move |e| {
            h.lock().unwrap().push(e.metadata.get("seen_by").cloned());
            Ok(())
        });
        let after = Arc::new(Mutex::new(Vec::new()));
        let (a, h2) = (after.clone(), handled.clone());
        bus.post(move |e| {
            // Post-middleware runs after the handlers have seen the event.
            a.lock()
                .unwrap()
                .push((e.name.clone(), h2.lock().unwrap().len()));
        });
        assert_eq!(
            bus.publish(ev("entity.changed", "a.b")).unwrap(),
            Published::Delivered(1)
        );
        assert_eq!(
            bus.publish(ev("entity.changed", "secret.thing")).unwrap(),
            Published::Dropped
        );
        bus.publish(ev("room.chat", "r")).unwrap();
        assert_eq!(
            *handled.lock().unwrap(),
            [Some("pre".into()), Some("pre".into())]
        );
        assert_eq!(
            *after.lock().unwrap(),
            [
                ("entity.changed".to_string(), 1),
                ("room.chat".to_string(), 2)
            ]
        );
        let stats = bus.stats();
        assert_eq!(stats.dropped_by_middleware, 1);
        assert_eq!(stats.published, 2);
        assert!(
            bus.history(&Pattern::all(), 10)
                .iter()
                .all(|e| e.metadata["seen_by"] == "pre")
        );
    }

    #[test]
    fn history_is_bounded_and_queried_by_pattern() {
        let bus = Bus::new();
        for i in 0..HISTORY_CAPACITY + 5 {
            let name = if i % 2 == 0 {
                "entity.changed"
            } else {
                "room.chat"
            };
            bus.publish(ev(name, &format!("s{i}"))).unwrap();
        }
        let all = bus.history(&Pattern::all(), usize::MAX);
        assert_eq!(all.len(), HISTORY_CAPACITY);
        assert_eq!(all[0].subject, "s5");
        let rooms = bus.history(&Pattern::parse("room.*").unwrap(), 3);
        let subjects: Vec<_> = rooms.iter().map(|e| e.subject.as_str()).collect();
        // Odd indexes are room events; the last one published is the largest odd index.
        let last = (0..HISTORY_CAPACITY + 5)
            .rev()
            .find(|i| i % 2 == 1)
            .unwrap();
        assert_eq!(
            subjects,
            [
                format!("s{}", last - 4),
                format!("s{}", last - 2),
                format!("s{last}")
            ]
        );
        assert!(rooms.iter().all(|e| e.name == "room.chat"));
    }

    #[test]
    fn stats_count_events_per_name_and_time_handlers() {
        let bus = Bus::new();
        bus.subscribe(Filter::new("entity.*").unwrap(), |_| {
            std::thread::sleep(Duration::from_millis(2));
            Ok(())
        });
        for _ in 0..3 {
            bus.publish(ev("entity.changed", "a.b")).unwrap();
        }
        bus.publish(ev("room.chat", "r")).unwrap();
        assert!(bus.publish(ev("bad..name", "r")).is_err());
        let stats = bus.stats();
        assert_eq!(stats.published, 4);
        assert_eq!(stats.refused, 1);
        let entity = &stats.by_name["entity.changed"];
        assert_eq!((entity.published, entity.delivered), (3, 3));
        assert!(entity.handler_time >= Duration::from_millis(6));
        assert!(entity.handler_time_max >= Duration::from_millis(2));
        let room = &stats.by_name["room.chat"];
        assert_eq!((room.published, room.delivered), (1, 0));
    }

    #[test]
    fn stats_names_are_capped() {
        let bus = Bus::new();
        for i in 0..MAX_STATS_NAMES + 3 {
            bus.publish(ev(&format!("area.action{i}"), "s")).unwrap();
        }
        let stats = bus.stats();
        assert_eq!(stats.by_name.len(), MAX_STATS_NAMES + 1);
        assert_eq!(stats.by_name[OTHER_NAMES].published, 3);
    }

    #[test]
    fn correlation_ids_are_kept_and_capped() {
        let bus = Bus::new();
        let mut stream = bus.stream(Filter::all(), 4);
        bus.publish(ev("entity.changed", "a.b").with_correlation_id(Some("req-1".into())))
            .unwrap();
        assert_eq!(
            stream.try_recv().unwrap().correlation_id.as_deref(),
            Some("req-1")
        );
        let long = "x".repeat(MAX_CORRELATION_ID_LEN + 1);
        assert!(
            bus.publish(ev("entity.changed", "a.b").with_correlation_id(Some(long)))
                .is_err()
        );
        assert!(stream.try_recv().is_none());
    }

    #[tokio::test]
    async fn wait_for_returns_the_next_match_or_none_on_timeout() {
        let bus = Bus::new();
        let waiting = bus.wait_for("peer.*", Duration::from_secs(30)).unwrap();
        bus.publish(ev("entity.changed", "a.b")).unwrap();
        bus.publish(ev("peer.connected", "p1")).unwrap();
        let got = waiting.await.unwrap();
        assert_eq!(
            (got.name.as_str(), got.subject.as_str()),
            ("peer.connected", "p1")
        );

        let nothing = bus
            .wait_for("peer.*", Duration::from_millis(20))
            .unwrap()
            .await;
        assert!(nothing.is_none());
        // Neither waiter is left subscribed.
        assert_eq!(bus.stats().subscriptions, 0);
        assert!(bus.wait_for("bad..", Duration::from_secs(1)).is_err());
    }

    #[tokio::test]
    async fn a_stream_that_falls_behind_is_closed_and_others_keep_receiving() {
        let bus = Bus::new();
        let mut slow = bus.stream(Filter::all(), 2);
        let mut fast = bus.stream(Filter::all(), 64);
        for i in 0..10 {
            bus.publish(ev("entity.changed", &format!("s{i}"))).unwrap();
            assert_eq!(fast.recv().await.unwrap().subject, format!("s{i}"));
        }
        assert!(slow.overflowed());
        slow.wait_overflow().await;
        // What was queued before the overflow is still there, then the stream ends.
        assert_eq!(slow.recv().await.unwrap().subject, "s0");
        assert_eq!(slow.recv().await.unwrap().subject, "s1");
        assert!(slow.recv().await.is_none());
        let stats = bus.stats();
        assert_eq!(stats.streams_overflowed, 1);
        assert_eq!(stats.subscriptions, 1);
        drop(fast);
        assert_eq!(bus.stats().subscriptions, 0);
    }
}
