//! The node's side of the bandwidth limits: the one [`Shaper`] every session charges, built
//! from `[bandwidth]`, told of reloads, and ticked once a second to follow the schedule (local
//! time) and measure the current rates for `status`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::Config;
use crate::net::bandwidth::{Limits, LocalTime, Shaper};

/// The limits in the config; a config that failed validation never gets here, so a bad one
/// falls back to none rather than stopping the node.
fn limits(config: &Config) -> Limits {
    config.bandwidth.limits().unwrap_or_default()
}

pub fn shaper(config: &Config) -> Arc<Shaper> {
    Arc::new(Shaper::new(limits(config), Instant::now(), local_now()))
}

/// SIGHUP: the new limits apply from the next read or write of every session.
pub fn reload(shaper: &Shaper, config: &Config) {
    shaper.set_limits(limits(config), Instant::now(), local_now());
}

/// Follows the schedule and measures rates, once a second, until the runtime stops.
pub fn tick_every_second(shaper: Arc<Shaper>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            shaper.tick(Instant::now(), local_now());
        }
    });
}

/// The local weekday (0 Monday) and minute of the day, from the system's time zone.
pub fn local_now() -> LocalTime {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which lives on this stack frame; it reads
    // the process's time zone (thread-safe, unlike localtime).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = !unsafe { libc::localtime_r(&now, &mut tm) }.is_null();
    if !ok {
        // No local time: UTC from the clock alone (1970-01-01 was a Thursday).
        let days = now.max(0) as u64 / 86_400;
        let minute = (now.max(0) as u64 % 86_400 / 60) as u16;
        return LocalTime {
            weekday: ((days + 3) % 7) as u8,
            minute,
        };
    }
    LocalTime {
        // tm_wday counts from Sunday.
        weekday: ((tm.tm_wday + 6) % 7) as u8,
        minute: (tm.tm_hour * 60 + tm.tm_min) as u16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_time_is_a_time_of_the_week() {
        let t = local_now();
        assert!(t.weekday < 7);
        assert!(t.minute < 24 * 60);
    }
}
