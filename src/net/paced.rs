//! The IO edge of [`super::bandwidth`]: the read and write halves of an authenticated session,
//! wrapped so that every encrypted byte is counted and, while a limit is in force, charged to
//! the node's buckets and the peer's. A half in debt waits before its next read or write: a
//! slow reader makes TCP hold the peer back, a slow writer holds our own queue.
//!
//! While a limit is in force each read or write moves at most [`QUANTUM`] bytes. Without one
//! the halves only count bytes (one relaxed atomic load and add per call).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::bandwidth::{Direction, QUANTUM, Shaper};
use crate::crypto::identity::NodeId;

/// Who a session's bytes are charged to.
#[derive(Clone, Debug)]
pub struct Pacing {
    pub shaper: Arc<Shaper>,
    pub peer: NodeId,
    /// The peer is on this host or the same private network (`lan_unlimited` applies).
    pub lan: bool,
}

/// Set by the link's writer while it writes a control message (a ping, a pong): its bytes are
/// charged but do not wait for a debt to be paid, so a saturated link still answers pings.
#[derive(Clone, Debug, Default)]
pub struct ControlWrites(Arc<AtomicBool>);

impl ControlWrites {
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }

    fn on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Told (at most once a second) that bytes arrived from the peer: it is alive even when its
/// pong is queued behind a long message on a slow link.
pub type Heard = Arc<dyn Fn() + Send + Sync>;

const HEARD_EVERY: Duration = Duration::from_secs(1);

/// A half sleeping off a debt looks again this often: limits raised or removed by a reload
/// apply within this time, not when a debt reckoned at the old rate is paid.
const RECHECK: Duration = Duration::from_millis(250);

/// A control write skips the wait only while the debt is due within this: a peer flooding
/// pings cannot push the node's traffic past its limit (the pongs then wait like the rest).
const CONTROL_SLACK: Duration = Duration::from_secs(1);

/// The wait for a debt, shared by both halves' logic.
#[derive(Default)]
struct Debt {
    /// When the debt of the last charge is paid.
    due: Option<Instant>,
    /// The shaper's limits generation it was reckoned under.
    generation: u64,
    wait: Option<Pin<Box<Sleep>>>,
}

impl Debt {
    fn poll_paid(&mut self, cx: &mut Context<'_>, shaper: &Shaper) -> Poll<()> {
        loop {
            let Some(due) = self.due else {
                self.wait = None;
                return Poll::Ready(());
            };
            let now = Instant::now();
            if now >= due || shaper.generation() != self.generation {
                // Paid, or the limits changed: the next charge says what is owed now.
                self.due = None;
                continue;
            }
            let until = tokio::time::Instant::from_std(due.min(now + RECHECK));
            let wait = self
                .wait
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            wait.as_mut().reset(until);
            ready!(wait.as_mut().poll(cx));
        }
    }

    fn clear(&mut self) {
        self.due = None;
        self.wait = None;
    }

    fn due_within(&self, slack: Duration) -> bool {
        self.due.is_none_or(|due| due <= Instant::now() + slack)
    }

    fn charge(&mut self, pacing: &Pacing, dir: Direction, bytes: usize) {
        self.generation = pacing.shaper.generation();
        let due = pacing
            .shaper
            .charge(dir, &pacing.peer, Instant::now(), bytes);
        // A control write's debt adds to one still being slept off.
        self.due = due.max(self.due);
    }
}

/// A session's read half under the limits.
pub struct PacedRead<R> {
    inner: R,
    pacing: Pacing,
    debt: Debt,
    heard: Option<Heard>,
    last_heard: Option<Instant>,
}

impl<R> PacedRead<R> {
    pub fn new(inner: R, pacing: Pacing, heard: Option<Heard>) -> Self {
        PacedRead {
            inner,
            pacing,
            debt: Debt::default(),
            heard,
            last_heard: None,
        }
    }

    fn arrived(&mut self, bytes: usize) {
        self.pacing.shaper.count(Direction::Download, bytes);
        if bytes == 0 {
            return;
        }
        if let Some(heard) = &self.heard {
            let now = Instant::now();
            if self
                .last_heard
                .is_none_or(|last| now.duration_since(last) >= HEARD_EVERY)
            {
                self.last_heard = Some(now);
                heard();
            }
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for PacedRead<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this
            .pacing
            .shaper
            .paces(Direction::Download, this.pacing.lan)
        {
            this.debt.clear();
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            this.arrived(buf.filled().len() - before);
            return Poll::Ready(Ok(()));
        }
        ready!(this.debt.poll_paid(cx, &this.pacing.shaper));
        let room = buf.remaining().min(QUANTUM);
        let n = {
            let mut small = ReadBuf::new(buf.initialize_unfilled_to(room));
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut small))?;
            small.filled().len()
        };
        buf.advance(n);
        this.arrived(n);
        this.debt.charge(&this.pacing, Direction::Download, n);
        Poll::Ready(Ok(()))
    }
}

/// A session's write half under the limits.
pub struct PacedWrite<W> {
    inner: W,
    pacing: Pacing,
    debt: Debt,
    control: ControlWrites,
}

impl<W> PacedWrite<W> {
    pub fn new(inner: W, pacing: Pacing, control: ControlWrites) -> Self {
        PacedWrite {
            inner,
            pacing,
            debt: Debt::default(),
            control,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for PacedWrite<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let paced = this.pacing.shaper.paces(Direction::Upload, this.pacing.lan);
        if !paced {
            this.debt.clear();
        } else if !(this.control.on() && this.debt.due_within(CONTROL_SLACK)) {
            ready!(this.debt.poll_paid(cx, &this.pacing.shaper));
        }
        let len = if paced {
            buf.len().min(QUANTUM)
        } else {
            buf.len()
        };
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..len]))?;
        this.pacing.shaper.count(Direction::Upload, n);
        if paced {
            this.debt.charge(&this.pacing, Direction::Upload, n);
        }
        Poll::Ready(Ok(n))
    }

    /// Without a limit, vectored writes go straight through (the framed writer uses them).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pacing.shaper.paces(Direction::Upload, this.pacing.lan) {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return Pin::new(this).poll_write(cx, first);
        }
        this.debt.clear();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        this.pacing.shaper.count(Direction::Upload, n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Whether an address is this host or on a private network (RFC 1918, link-local, unique
/// local IPv6): the peers `lan_unlimited` leaves alone.
pub fn is_lan(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_lan(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::bandwidth::{Limits, LocalTime, Rates};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const MIB: u64 = 1024 * 1024;

    fn shaper(rates: Rates) -> Arc<Shaper> {
        Arc::new(Shaper::new(
            Limits {
                usual: rates,
                ..Limits::default()
            },
            Instant::now(),
            LocalTime {
                weekday: 0,
                minute: 0,
            },
        ))
    }

    fn pacing(shaper: &Arc<Shaper>) -> Pacing {
        Pacing {
            shaper: shaper.clone(),
            peer: NodeId::from_bytes([3; 16]),
            lan: false,
        }
    }

    #[test]
    fn private_and_local_addresses_are_lan() {
        for lan in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.9",
            "192.168.1.20",
            "169.254.3.4",
            "::1",
            "fd12::1",
            "fe80::1",
            "::ffff:192.168.0.2",
        ] {
            assert!(is_lan(lan.parse().unwrap()), "{lan}");
        }
        for wan in ["8.8.8.8", "172.32.0.1", "2001:db8::1", "::ffff:1.1.1.1"] {
            assert!(!is_lan(wan.parse().unwrap()), "{wan}");
        }
    }

    /// Writes 2 MiB through an upload limit of 4 MiB/s: half a second, less the burst.
    #[tokio::test]
    async fn writes_follow_the_upload_limit_and_reads_the_download_limit() {
        let up = shaper(Rates {
            upload: 4 * MIB,
            ..Rates::default()
        });
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut writer = PacedWrite::new(a, pacing(&up), ControlWrites::default());
        let reader = tokio::spawn(async move {
            let mut b = b;
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.map(|_| got.len())
        });
        let start = Instant::now();
        writer
            .write_all(&vec![7u8; 2 * MIB as usize])
            .await
            .unwrap();
        writer.shutdown().await.unwrap();
        let took = start.elapsed().as_secs_f64();
        assert_eq!(reader.await.unwrap().unwrap(), 2 * MIB as usize);
        // 2 MiB less the 512 KiB burst at 4 MiB/s: 0.375 s.
        assert!(took >= 0.35, "too fast: {took}");
        assert!(took < 1.0, "too slow: {took}");
        assert_eq!(up.snapshot().in_force.upload, 4 * MIB);

        let down = shaper(Rates {
            download: 4 * MIB,
            ..Rates::default()
        });
        let (mut a, b) = tokio::io::duplex(64 * 1024);
        let heard = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = heard.clone();
        let mut reader = PacedRead::new(
            b,
            pacing(&down),
            Some(Arc::new(move || {
                count.fetch_add(1, Ordering::Relaxed);
            })),
        );
        tokio::spawn(async move {
            let _ = a.write_all(&vec![1u8; 2 * MIB as usize]).await;
        });
        let start = Instant::now();
        let mut got = vec![0u8; 2 * MIB as usize];
        reader.read_exact(&mut got).await.unwrap();
        let took = start.elapsed().as_secs_f64();
        assert!(took >= 0.35, "too fast: {took}");
        assert!(took < 1.0, "too slow: {took}");
        assert_eq!(heard.load(Ordering::Relaxed), 1, "once a second at most");
    }

    /// A writer limited to `rate` that has spent its burst (one quantum at these rates) and
    /// owes one quantum more; its control flag; the other end of its pipe.
    async fn in_debt(
        rate: u64,
    ) -> (
        PacedWrite<tokio::io::DuplexStream>,
        ControlWrites,
        tokio::io::DuplexStream,
    ) {
        let up = shaper(Rates {
            upload: rate,
            ..Rates::default()
        });
        let (a, b) = tokio::io::duplex(4 * MIB as usize);
        let control = ControlWrites::default();
        let mut writer = PacedWrite::new(a, pacing(&up), control.clone());
        writer.write_all(&vec![0u8; 2 * QUANTUM]).await.unwrap();
        (writer, control, b)
    }

    /// A control write does not wait for the bulk debt before it; the next bulk write pays.
    #[tokio::test]
    async fn control_writes_skip_the_wait() {
        // A quantum of debt at a quantum a second: a second.
        let (mut writer, control, mut b) = in_debt(QUANTUM as u64).await;
        let start = Instant::now();
        control.set(true);
        writer.write_all(b"pong").await.unwrap();
        control.set(false);
        assert!(start.elapsed() < Duration::from_millis(100));
        let mut sink = vec![0u8; 2 * QUANTUM + 4];
        b.read_exact(&mut sink).await.unwrap();
        assert_eq!(&sink[sink.len() - 4..], b"pong");
        // The bulk write after it waits out the debt, the pong's bytes included.
        writer.write_all(b"x").await.unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "{:?}",
            start.elapsed()
        );
    }

    /// A flood of control writes cannot run up a debt: past a second of it they wait too.
    #[tokio::test]
    async fn control_writes_wait_once_the_debt_is_long() {
        // A quantum of debt at half a quantum a second: two seconds.
        let (mut writer, control, _b) = in_debt(QUANTUM as u64 / 2).await;
        let start = Instant::now();
        control.set(true);
        writer.write_all(b"pong").await.unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "{:?}",
            start.elapsed()
        );
    }

    /// A half sleeping off a debt reckoned at a crawl goes on soon after the limit is lifted.
    #[tokio::test]
    async fn lifting_a_limit_wakes_a_sleeping_writer() {
        let limits = |upload| Limits {
            usual: Rates {
                upload,
                ..Rates::default()
            },
            ..Limits::default()
        };
        let monday = LocalTime {
            weekday: 0,
            minute: 0,
        };
        let up = Arc::new(Shaper::new(limits(1024), Instant::now(), monday));
        let (a, _b) = tokio::io::duplex(4 * MIB as usize);
        let mut writer = PacedWrite::new(a, pacing(&up), ControlWrites::default());
        // The burst, then a quantum of debt at 1 KiB/s: sixteen seconds.
        writer.write_all(&vec![0u8; 2 * QUANTUM]).await.unwrap();
        let lift = up.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            lift.set_limits(limits(0), Instant::now(), monday);
        });
        let start = Instant::now();
        writer.write_all(b"more").await.unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(150),
            "did not wait at all: {took:?}"
        );
        assert!(took < Duration::from_secs(2), "still sleeping: {took:?}");
    }

    #[tokio::test]
    async fn without_a_limit_bytes_are_only_counted() {
        let none = Arc::new(Shaper::unlimited());
        let (a, mut b) = tokio::io::duplex(8 * MIB as usize);
        let mut writer = PacedWrite::new(a, pacing(&none), ControlWrites::default());
        let start = Instant::now();
        writer
            .write_all(&vec![0u8; 4 * MIB as usize])
            .await
            .unwrap();
        assert!(start.elapsed() < Duration::from_millis(500));
        let mut got = vec![0u8; 4 * MIB as usize];
        b.read_exact(&mut got).await.unwrap();
        none.tick(
            Instant::now() + Duration::from_secs(1),
            LocalTime {
                weekday: 0,
                minute: 0,
            },
        );
        assert!(none.snapshot().upload_now > 0);
    }
}
