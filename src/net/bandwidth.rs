//! Bandwidth limits for home uplinks (issue 22): token buckets per direction, for all peers
//! together and for each peer, whose rates can follow a weekly schedule and change live.
//!
//! Pure: every call takes `now`, nothing here sleeps or reads a clock, so the rules are tested
//! on a virtual clock. The IO edge that waits is [`super::paced`]; it charges the encrypted
//! bytes of every frame, read and written, so all traffic (backup, restore, rebuild, audits,
//! serving customers) is under the limit.
//!
//! A charge never fails: the bucket goes into debt and says when the debt is paid. Whoever
//! charged waits until then before its next read or write. Each charge is at most [`QUANTUM`]
//! bytes, so peers that wait take turns in the order they charged: they share a limit fairly.
//! Control messages (pings, pongs) are charged but do not wait (the link says which they are):
//! bulk fragments pay their bytes back, and a saturated link still answers pings.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::crypto::identity::NodeId;

/// The most one read or write takes before it is charged, while a limit is in force: small
/// enough that peers interleave finely and a lowered limit bites at once.
pub const QUANTUM: usize = 16 * 1024;

/// The largest burst a bucket allows: a home router's buffer absorbs it without a video call
/// noticing (Syncthing uses the same 512 KiB).
const MAX_BURST: u64 = 512 * 1024;

/// A peer's buckets idle this long (and out of debt) are forgotten.
const PEER_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Upload,
    Download,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::Upload => 0,
            Direction::Download => 1,
        }
    }
}

/// One token bucket: `rate` bytes per second (0: unlimited), up to `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: f64,
    /// Bytes that may go now; negative while in debt.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket starts full.
    pub fn new(rate: u64, now: Instant) -> Self {
        let burst = burst_for(rate);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn refill(&mut self, now: Instant) {
        if now > self.last {
            let earned = self.rate as f64 * (now - self.last).as_secs_f64();
            self.tokens = (self.tokens + earned).min(self.burst);
            self.last = now;
        }
    }

    /// Takes `bytes`; `Some(t)`: the bucket is in debt until `t`, and the caller waits until
    /// then before it moves more bytes.
    pub fn charge(&mut self, now: Instant, bytes: usize) -> Option<Instant> {
        if self.rate == 0 {
            return None;
        }
        self.refill(now);
        self.tokens -= bytes as f64;
        self.ready_at()
    }

    /// When the debt is paid (`None`: not in debt), reckoned from the last charge.
    pub fn ready_at(&self) -> Option<Instant> {
        if self.rate == 0 || self.tokens >= 0.0 {
            return None;
        }
        Some(self.last + Duration::from_secs_f64(-self.tokens / self.rate as f64))
    }

    /// A new rate from `now` on. Debt is kept (it is paid at the new rate); a bucket that was
    /// unlimited starts full.
    pub fn set_rate(&mut self, now: Instant, rate: u64) {
        if rate == self.rate {
            return;
        }
        if self.rate == 0 {
            *self = TokenBucket::new(rate, now);
            return;
        }
        self.refill(now);
        self.last = self.last.max(now);
        self.rate = rate;
        self.burst = burst_for(rate);
        self.tokens = self.tokens.min(self.burst);
    }

    /// Unused for a while and out of debt (a debt is paid by time alone).
    fn idle(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last) >= PEER_IDLE
            && self.ready_at().is_none_or(|due| due <= now)
    }
}

/// A quarter second of traffic, at least one quantum and at most [`MAX_BURST`].
fn burst_for(rate: u64) -> f64 {
    (rate / 4).clamp(QUANTUM as u64, MAX_BURST) as f64
}

/// The rates one moment allows, bytes per second (0: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    pub upload: u64,
    pub download: u64,
    pub per_peer_upload: u64,
    pub per_peer_download: u64,
}

impl Rates {
    fn total(&self, dir: Direction) -> u64 {
        match dir {
            Direction::Upload => self.upload,
            Direction::Download => self.download,
        }
    }

    fn per_peer(&self, dir: Direction) -> u64 {
        match dir {
            Direction::Upload => self.per_peer_upload,
            Direction::Download => self.per_peer_download,
        }
    }

    fn limits(&self, dir: Direction) -> bool {
        self.total(dir) != 0 || self.per_peer(dir) != 0
    }
}

/// A local time of the week: `weekday` 0 is Monday, `minute` counts from midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    pub weekday: u8,
    pub minute: u16,
}

pub const MINUTES_PER_DAY: u16 = 24 * 60;

/// A schedule entry: on `days` (bit 0 Monday … bit 6 Sunday), from `from` until `to` (minutes
/// of the day; `to` before `from` runs past midnight into the next day, `to == from` is the
/// whole day), these rates replace the usual ones (`None`: the usual one stays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub days: u8,
    pub from: u16,
    pub to: u16,
    pub upload: Option<u64>,
    pub download: Option<u64>,
}

impl Window {
    pub fn covers(&self, t: LocalTime) -> bool {
        let on = |day: u8| self.days & (1 << (day % 7)) != 0;
        let yesterday = (t.weekday + 6) % 7;
        match self.from.cmp(&self.to) {
            std::cmp::Ordering::Less => on(t.weekday) && (self.from..self.to).contains(&t.minute),
            std::cmp::Ordering::Equal => on(t.weekday),
            std::cmp::Ordering::Greater => {
                (on(t.weekday) && t.minute >= self.from) || (on(yesterday) && t.minute < self.to)
            }
        }
    }
}

/// Everything the `[bandwidth]` section says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub usual: Rates,
    /// Peers on the same private network (or this host) are not limited.
    pub lan_unlimited: bool,
    /// The first entry that covers a moment sets its total rates.
    pub schedule: Vec<Window>,
}

impl Limits {
    pub fn rates_at(&self, t: LocalTime) -> Rates {
        let mut rates = self.usual;
        if let Some(window) = self.schedule.iter().find(|w| w.covers(t)) {
            rates.upload = window.upload.unwrap_or(rates.upload);
            rates.download = window.download.unwrap_or(rates.download);
        }
        rates
    }
}

/// What `status` shows: the rates in force and the rates measured over the last second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub in_force: Rates,
    pub lan_unlimited: bool,
    pub upload_now: u64,
    pub download_now: u64,
}

struct PeerBuckets {
    buckets: [TokenBucket; 2],
}

struct Meter {
    at: Instant,
    bytes: [u64; 2],
    rate: [u64; 2],
}

struct State {
    limits: Limits,
    in_force: Rates,
    total: [TokenBucket; 2],
    peers: HashMap<NodeId, PeerBuckets>,
    meter: Meter,
}

/// The node's limits and buckets, shared by every link.
pub struct Shaper {
    state: Mutex<State>,
    /// Whether a direction has any limit in force: links skip the lock while it has none.
    limited: [AtomicBool; 2],
    lan_unlimited: AtomicBool,
    /// Bytes moved in each direction since start, limited or not.
    bytes: [AtomicU64; 2],
    /// Bumped when the rates in force change: a wait reckoned before is looked at again.
    generation: AtomicU64,
}

impl std::fmt::Debug for Shaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shaper").finish_non_exhaustive()
    }
}

impl Shaper {
    pub fn new(limits: Limits, now: Instant, local: LocalTime) -> Self {
        let in_force = limits.rates_at(local);
        let shaper = Shaper {
            state: Mutex::new(State {
                total: [
                    TokenBucket::new(in_force.upload, now),
                    TokenBucket::new(in_force.download, now),
                ],
                peers: HashMap::new(),
                meter: Meter {
                    at: now,
                    bytes: [0; 2],
                    rate: [0; 2],
                },
                limits: limits.clone(),
                in_force,
            }),
            limited: [AtomicBool::new(false), AtomicBool::new(false)],
            lan_unlimited: AtomicBool::new(limits.lan_unlimited),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            generation: AtomicU64::new(0),
        };
        shaper.publish(&in_force, limits.lan_unlimited);
        shaper
    }

    /// No limits at all (tests, tools).
    pub fn unlimited() -> Self {
        Shaper::new(
            Limits::default(),
            Instant::now(),
            LocalTime {
                weekday: 0,
                minute: 0,
            },
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, rates: &Rates, lan_unlimited: bool) {
        for dir in [Direction::Upload, Direction::Download] {
            self.limited[dir.index()].store(rates.limits(dir), Ordering::Relaxed);
        }
        self.lan_unlimited.store(lan_unlimited, Ordering::Relaxed);
    }

    /// Whether traffic with a peer in this direction is paced now (`lan`: the peer is on this
    /// host or the same private network).
    pub fn paces(&self, dir: Direction, lan: bool) -> bool {
        self.limited[dir.index()].load(Ordering::Relaxed)
            && !(lan && self.lan_unlimited.load(Ordering::Relaxed))
    }

    /// Changes whenever the rates in force or the LAN exemption change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Counts bytes that moved, paced or not.
    pub fn count(&self, dir: Direction, bytes: usize) {
        self.bytes[dir.index()].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Charges `bytes` with `peer` to the total bucket and the peer's; `Some(t)`: wait until
    /// `t` before moving more bytes with this peer.
    pub fn charge(
        &self,
        dir: Direction,
        peer: &NodeId,
        now: Instant,
        bytes: usize,
    ) -> Option<Instant> {
        let i = dir.index();
        let mut guard = self.lock();
        let state = &mut *guard;
        let total = state.total[i].charge(now, bytes);
        if state.in_force.per_peer(dir) == 0 {
            return total;
        }
        let rates = state.in_force;
        let own = state.peers.entry(*peer).or_insert_with(|| PeerBuckets {
            buckets: [
                TokenBucket::new(rates.per_peer_upload, now),
                TokenBucket::new(rates.per_peer_download, now),
            ],
        });
        total.max(own.buckets[i].charge(now, bytes))
    }

    /// New limits (a reload): in force from `now`, without dropping a session.
    pub fn set_limits(&self, limits: Limits, now: Instant, local: LocalTime) {
        let mut state = self.lock();
        state.limits = limits;
        self.apply(&mut state, now, local);
    }

    /// Once a second: follows the schedule and measures the current rates.
    pub fn tick(&self, now: Instant, local: LocalTime) {
        let mut state = self.lock();
        self.apply(&mut state, now, local);
        let elapsed = now.saturating_duration_since(state.meter.at).as_secs_f64();
        if elapsed >= 0.5 {
            for i in 0..2 {
                let bytes = self.bytes[i].load(Ordering::Relaxed);
                let moved = bytes.saturating_sub(state.meter.bytes[i]);
                state.meter.rate[i] = (moved as f64 / elapsed) as u64;
                state.meter.bytes[i] = bytes;
            }
            state.meter.at = now;
        }
        state
            .peers
            .retain(|_, p| !p.buckets.iter().all(|b| b.idle(now)));
    }

    fn apply(&self, state: &mut State, now: Instant, local: LocalTime) {
        let rates = state.limits.rates_at(local);
        let rates_changed = rates != state.in_force;
        if !rates_changed
            && state.limits.lan_unlimited == self.lan_unlimited.load(Ordering::Relaxed)
        {
            // The usual tick: nothing in force changed.
            return;
        }
        self.generation.fetch_add(1, Ordering::Relaxed);
        if rates_changed {
            tracing::info!(
                upload = rates.upload,
                download = rates.download,
                per_peer_upload = rates.per_peer_upload,
                per_peer_download = rates.per_peer_download,
                "bandwidth limits in force (bytes per second, 0 = unlimited)"
            );
        }
        state.in_force = rates;
        state.total[0].set_rate(now, rates.upload);
        state.total[1].set_rate(now, rates.download);
        for peer in state.peers.values_mut() {
            peer.buckets[0].set_rate(now, rates.per_peer_upload);
            peer.buckets[1].set_rate(now, rates.per_peer_download);
        }
        self.publish(&rates, state.limits.lan_unlimited);
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        Snapshot {
            in_force: state.in_force,
            lan_unlimited: state.limits.lan_unlimited,
            upload_now: state.meter.rate[0],
            download_now: state.meter.rate[1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn monday_noon() -> LocalTime {
        LocalTime {
            weekday: 0,
            minute: 12 * 60,
        }
    }

    #[test]
    fn a_full_bucket_lets_its_burst_go_then_charges_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(MIB, t0);
        // The burst: a quarter second of traffic.
        assert_eq!(b.charge(t0, (MIB / 4) as usize), None);
        // One byte more is a debt of one byte.
        let wait = b.charge(t0, 1).expect("in debt");
        assert!(wait > t0 && wait <= at(t0, 1));
        // 1 MiB more at 1 MiB/s: due a second later.
        let due = b.charge(t0, MIB as usize).expect("in debt");
        let late = due.duration_since(t0).as_secs_f64();
        assert!((late - 1.0).abs() < 0.001, "{late}");
    }

    #[test]
    fn refill_stops_at_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(MIB, t0);
        assert_eq!(b.charge(t0, (MIB / 4) as usize), None);
        // An hour idle saves up a quarter second, not an hour.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.charge(later, (MIB / 4) as usize), None);
        assert!(b.charge(later, 1).is_some());
    }

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, t0);
        for _ in 0..1000 {
            assert_eq!(b.charge(t0, 1 << 30), None);
        }
    }

    /// Sends as fast as the bucket allows, one quantum a step, for `secs` of virtual time:
    /// the bytes admitted never exceed rate × time + burst, and reach at least rate × time.
    #[test]
    fn admitted_bytes_follow_the_rate() {
        for rate in [64 * KIB, MIB, 16 * MIB] {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(rate, t0);
            let mut now = t0;
            let mut sent = 0u64;
            let end = at(t0, 10_000);
            let mut steps = 0;
            while now < end {
                // A bucket that never says "wait" fails here, not by hanging the suite.
                steps += 1;
                assert!(steps < 100_000, "rate {rate}: time does not advance");
                sent += QUANTUM as u64;
                if let Some(t) = b.charge(now, QUANTUM) {
                    now = t;
                }
            }
            let secs = 10.0;
            let most = rate as f64 * secs + burst_for(rate) + QUANTUM as f64;
            assert!(sent as f64 <= most, "rate {rate}: {sent} > {most}");
            assert!(sent as f64 >= rate as f64 * secs, "rate {rate}: {sent}");
        }
    }

    /// Peers that wait take turns: over ten seconds each of two gets half the total, or its own
    /// limit when that is lower.
    #[test]
    fn peers_share_a_limit_fairly() {
        let share = |per_peer: u64| {
            let t0 = Instant::now();
            let limits = Limits {
                usual: Rates {
                    upload: MIB,
                    per_peer_upload: per_peer,
                    ..Rates::default()
                },
                ..Limits::default()
            };
            let shaper = Shaper::new(limits, t0, monday_noon());
            let peers = [NodeId::from_bytes([1; 16]), NodeId::from_bytes([2; 16])];
            let mut next = [t0, t0];
            let mut sent = [0u64; 2];
            let mut last = 1;
            let end = at(t0, 10_000);
            let mut steps = 0;
            loop {
                steps += 1;
                assert!(steps < 100_000, "time does not advance");
                // The peer whose wait ends first goes next; on a tie, the one that went
                // less recently (both are ready: they take turns).
                let i = match next[0].cmp(&next[1]) {
                    std::cmp::Ordering::Less => 0,
                    std::cmp::Ordering::Greater => 1,
                    std::cmp::Ordering::Equal => 1 - last,
                };
                last = i;
                if next[i] >= end {
                    break;
                }
                sent[i] += QUANTUM as u64;
                let now = next[i];
                next[i] = shaper
                    .charge(Direction::Upload, &peers[i], now, QUANTUM)
                    .unwrap_or(now);
            }
            sent
        };
        let [a, b] = share(0);
        let total = (a + b) as f64;
        assert!(
            (total - 10.0 * MIB as f64).abs() < 1.0 * MIB as f64,
            "{total}"
        );
        assert!(
            (a as f64 - b as f64).abs() <= 2.0 * QUANTUM as f64,
            "{a} vs {b}"
        );
        // A per-peer limit below half the total binds each peer...
        for sent in share(256 * KIB) {
            assert!(
                (sent as f64 - 2.5 * MIB as f64).abs() < 0.1 * MIB as f64,
                "per-peer cap: {sent}"
            );
        }
        // ...one above it leaves the total to bind, shared evenly.
        let [a, b] = share(768 * KIB);
        assert!(
            (a as f64 - b as f64).abs() <= 2.0 * QUANTUM as f64,
            "{a} vs {b}"
        );
        assert!(((a + b) as f64 - 10.0 * MIB as f64).abs() < 0.5 * MIB as f64);
    }

    #[test]
    fn a_lowered_rate_bites_from_the_next_charge() {
        let t0 = Instant::now();
        let shaper = Shaper::new(
            Limits {
                usual: Rates {
                    upload: 4 * MIB,
                    ..Rates::default()
                },
                ..Limits::default()
            },
            t0,
            monday_noon(),
        );
        let peer = NodeId::from_bytes([7; 16]);
        // Drain the burst, then one quantum costs a quarter of 16 KiB/4 MiB.
        shaper.charge(Direction::Upload, &peer, t0, MIB as usize);
        let slow = Limits {
            usual: Rates {
                upload: 64 * KIB,
                ..Rates::default()
            },
            ..Limits::default()
        };
        shaper.set_limits(slow, t0, monday_noon());
        let due = shaper
            .charge(Direction::Upload, &peer, t0, QUANTUM)
            .expect("in debt");
        // The old debt (1 MiB − 512 KiB of burst) plus a quantum, paid at 64 KiB/s.
        let secs = due.duration_since(t0).as_secs_f64();
        assert!((secs - (512.0 + 16.0) / 64.0).abs() < 0.01, "{secs}");
        assert_eq!(shaper.snapshot().in_force.upload, 64 * KIB);
        let generation = shaper.generation();
        // Back to unlimited: no wait at all, and waits reckoned before are looked at again.
        shaper.set_limits(Limits::default(), t0, monday_noon());
        assert_ne!(shaper.generation(), generation);
        assert_eq!(shaper.charge(Direction::Upload, &peer, t0, 1 << 30), None);
        assert!(!shaper.paces(Direction::Upload, false));
    }

    #[test]
    fn lan_peers_are_paced_only_when_asked() {
        let t0 = Instant::now();
        let mut limits = Limits {
            usual: Rates {
                download: MIB,
                ..Rates::default()
            },
            lan_unlimited: true,
            ..Limits::default()
        };
        let shaper = Shaper::new(limits.clone(), t0, monday_noon());
        assert!(shaper.paces(Direction::Download, false));
        assert!(!shaper.paces(Direction::Download, true));
        assert!(!shaper.paces(Direction::Upload, false), "no upload limit");
        limits.lan_unlimited = false;
        shaper.set_limits(limits, t0, monday_noon());
        assert!(shaper.paces(Direction::Download, true));
    }

    fn window(days: u8, from: (u16, u16), to: (u16, u16), upload: u64) -> Window {
        Window {
            days,
            from: from.0 * 60 + from.1,
            to: to.0 * 60 + to.1,
            upload: Some(upload),
            download: None,
        }
    }

    fn time(weekday: u8, h: u16, m: u16) -> LocalTime {
        LocalTime {
            weekday,
            minute: h * 60 + m,
        }
    }

    #[test]
    fn schedule_boundaries() {
        const WEEKDAYS: u8 = 0b0011111;
        // Evenings on weekdays, 18:00 until 23:00: 1 MiB/s; otherwise 8 MiB/s.
        let limits = Limits {
            usual: Rates {
                upload: 8 * MIB,
                download: 3,
                ..Rates::default()
            },
            schedule: vec![window(WEEKDAYS, (18, 0), (23, 0), MIB)],
            ..Limits::default()
        };
        let up = |t| limits.rates_at(t).upload;
        assert_eq!(up(time(0, 17, 59)), 8 * MIB);
        assert_eq!(up(time(0, 18, 0)), MIB, "from is inside");
        assert_eq!(up(time(4, 22, 59)), MIB);
        assert_eq!(up(time(4, 23, 0)), 8 * MIB, "to is outside");
        assert_eq!(up(time(5, 19, 0)), 8 * MIB, "not on Saturday");
        assert_eq!(limits.rates_at(time(0, 19, 0)).download, 3, "download kept");

        // Past midnight: Friday 22:00 until 06:00 belongs to Friday.
        let night = Limits {
            schedule: vec![window(1 << 4, (22, 0), (6, 0), 5)],
            ..Limits::default()
        };
        let up = |t| night.rates_at(t).upload;
        assert_eq!(up(time(4, 21, 59)), 0);
        assert_eq!(up(time(4, 22, 0)), 5);
        assert_eq!(up(time(5, 5, 59)), 5, "Saturday morning is Friday night's");
        assert_eq!(up(time(5, 6, 0)), 0);
        assert_eq!(up(time(3, 23, 0)), 0, "not Thursday night");
        assert_eq!(up(time(4, 3, 0)), 0, "nor Friday early morning");

        // Sunday night runs into Monday.
        let sunday = window(1 << 6, (23, 0), (1, 0), 9);
        assert!(sunday.covers(time(0, 0, 30)));
        // from == to: the whole day.
        assert!(window(1 << 2, (0, 0), (0, 0), 1).covers(time(2, 23, 59)));
        assert!(!window(1 << 2, (0, 0), (0, 0), 1).covers(time(3, 0, 0)));

        // The first entry that covers a moment wins.
        let both = Limits {
            schedule: vec![
                window(0x7f, (9, 0), (17, 0), 1),
                window(0x7f, (0, 0), (0, 0), 2),
            ],
            ..Limits::default()
        };
        assert_eq!(both.rates_at(time(2, 10, 0)).upload, 1);
        assert_eq!(both.rates_at(time(2, 18, 0)).upload, 2);
    }

    #[test]
    fn the_schedule_is_followed_on_tick_and_rates_are_measured() {
        let t0 = Instant::now();
        let limits = Limits {
            schedule: vec![window(0x7f, (18, 0), (23, 0), MIB)],
            ..Limits::default()
        };
        let shaper = Shaper::new(limits, t0, time(0, 17, 59));
        assert!(!shaper.paces(Direction::Upload, false));
        shaper.count(Direction::Upload, 3 * MIB as usize);
        shaper.tick(at(t0, 1000), time(0, 18, 0));
        assert!(shaper.paces(Direction::Upload, false));
        let snap = shaper.snapshot();
        assert_eq!(snap.in_force.upload, MIB);
        assert_eq!(snap.upload_now, 3 * MIB);
        assert_eq!(snap.download_now, 0);
        shaper.tick(at(t0, 2000), time(0, 23, 0));
        assert!(!shaper.paces(Direction::Upload, false));
        assert_eq!(
            shaper.snapshot().upload_now,
            0,
            "nothing moved in the last second"
        );
    }

    #[test]
    fn idle_peers_are_forgotten() {
        let t0 = Instant::now();
        let shaper = Shaper::new(
            Limits {
                usual: Rates {
                    per_peer_upload: MIB,
                    ..Rates::default()
                },
                ..Limits::default()
            },
            t0,
            monday_noon(),
        );
        shaper.charge(Direction::Upload, &NodeId::from_bytes([1; 16]), t0, 1);
        // This one leaves in debt: 4 MiB at 1 MiB/s, paid about four seconds later.
        shaper.charge(
            Direction::Upload,
            &NodeId::from_bytes([2; 16]),
            t0,
            4 * MIB as usize,
        );
        shaper.tick(at(t0, 1000), monday_noon());
        assert_eq!(shaper.lock().peers.len(), 2);
        shaper.tick(t0 + PEER_IDLE + Duration::from_secs(1), monday_noon());
        assert_eq!(shaper.lock().peers.len(), 0);
    }
}
