//! A per-source durability estimate for `status`: the probability of losing a block within a
//! horizon (a year), from the layout (`k` data + `m` parity positions) and what was observed of
//! each position's supplier. Pure arithmetic: the caller brings the observations.
//!
//! # The model
//!
//! 1. **A supplier's loss rate comes from its availability.** A supplier reachable a fraction
//!    `a` of the observed time is taken to leave for good at a constant rate `λ = -ln(a)` per
//!    year: the chance it is gone within a year is `1 - a`. A supplier that is always there is
//!    never lost; one that is away half of the time is lost within a year with even odds.
//! 2. **New suppliers get a prior.** One observed for less than a day has its availability
//!    blended linearly with a prior of 0.9 (weight of the observation: the fraction of a day it
//!    was observed). A position with no observation at all gets the prior.
//! 3. **A lost fragment stays lost for `repair`** (the time until the supplier is fired plus the
//!    rebuild), then it is back, on a new supplier at the same position with the same loss rate.
//!    So position `j` is "in repair" at a given moment with probability
//!    `p_j = 1 - exp(-λ_j · repair)`: the chance it was lost within the last `repair`.
//! 4. **A block is lost when a position is lost while at least `m` others are in repair**: then
//!    fewer than `k` fragments are left to rebuild from. Such events come at the rate
//!    `Λ = Σ_i λ_i · P(at least m of the other positions are in repair)`, the probability being
//!    a Poisson-binomial tail (computed exactly by dynamic programming over the positions). The
//!    probability of at least one within the horizon `H` is `1 - exp(-Λ · H)`. With `m = 0`
//!    this is exact: the chance that any supplier is lost within `H`.
//! 5. **How many blocks matters little.** A source's blocks are spread over the same suppliers
//!    position by position, so the loss of `m + 1` suppliers takes every block at once and
//!    spares none: the probability that some block is lost is that of one block. `blocks` only
//!    counts when it is 0 (nothing stored, nothing to lose).
//!
//! # Limits
//!
//! - Availability is a proxy for the loss rate, not a measurement of it. A server with planned
//!   maintenance looks riskier than it is; a node that was always up and then vanishes looks
//!   safer. Only time (and departures actually seen) would tell the two apart.
//! - Suppliers fail independently: no shared provider, building, power cut or bad release.
//!   Correlated failures make the real figure worse, sometimes by orders of magnitude.
//! - Steady state: the estimate ignores the layout's present state (a block that is already
//!   degraded is the health matrix's business, shown beside this figure) and the bandwidth the
//!   rebuild needs beyond what `repair` says.
//! - Being unreachable is not being lost: a restore that finds too few suppliers online at that
//!   moment is an availability problem this figure does not count.
//! - Silent corruption is assumed caught by the audits and repaired like a loss.
//! - `Λ` counts loss events, not only the first; it overestimates only once the figure is large
//!   (then it is "large" either way), and `1 - exp(-Λ·H)` stays within `[0, 1]`.

use std::time::Duration;

/// One position's supplier as observed: the fraction of observed time it was reachable (0..=1)
/// and for how long it has been observed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observed {
    pub availability: f64,
    pub observed: Duration,
}

/// The availability assumed for a supplier nobody has watched yet.
const PRIOR_AVAILABILITY: f64 = 0.9;
/// How long a supplier must be observed before its own figure is taken alone.
const PRIOR_FADES_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Floor of the availability, so that a supplier never seen up has a finite (very high) rate.
const MIN_AVAILABILITY: f64 = 1e-9;
/// The loss rate's time unit: a supplier of availability `a` is lost within this with odds `1 - a`.
const YEAR_SECS: f64 = 365.25 * 24.0 * 3600.0;

/// The availability used for one position: clamped to `[0, 1]` (NaN counts as unknown), blended
/// with the prior while observed for less than a day.
fn effective_availability(observed: Option<&Observed>) -> f64 {
    let Some(o) = observed else {
        return PRIOR_AVAILABILITY;
    };
    let seen = if o.availability.is_nan() {
        PRIOR_AVAILABILITY
    } else {
        o.availability.clamp(0.0, 1.0)
    };
    let weight = (o.observed.as_secs_f64() / PRIOR_FADES_AFTER.as_secs_f64()).min(1.0);
    weight * seen + (1.0 - weight) * PRIOR_AVAILABILITY
}

/// Probability that at least `at_least` of the events happen, each independently with its own
/// probability (a Poisson-binomial tail). The last bucket absorbs every count from `at_least` up,
/// and nothing is computed as `1 - something`, so tiny tails keep their precision.
fn tail_at_least(probabilities: impl Iterator<Item = f64>, at_least: usize) -> f64 {
    // dist[c]: probability of exactly c events so far (c < at_least), or at least c (the last).
    let mut dist = vec![0.0; at_least + 1];
    dist[0] = 1.0;
    for p in probabilities {
        for c in (1..=at_least).rev() {
            let stay = if c == at_least { 1.0 } else { 1.0 - p };
            dist[c] = dist[c] * stay + dist[c - 1] * p;
        }
        if at_least > 0 {
            dist[0] *= 1.0 - p;
        }
    }
    dist[at_least]
}

/// Probability in [0, 1] that some block with this layout becomes unrecoverable within `horizon`,
/// given `repair`: how long a lost fragment stays lost before the node rebuilds it (fire_after +
/// rebuild time). `blocks`: how many blocks (loss of any one counts). Suppliers observed for less
/// than a day use a prior (availability 0.9) blended with what was seen. See the module doc for
/// the model: `positions[i]` is position `i`'s supplier; positions past the end of `positions`
/// use the prior, observations past `k + m` are ignored.
pub fn loss_probability(
    k: usize,
    m: usize,
    positions: &[Observed],
    repair: Duration,
    horizon: Duration,
    blocks: u64,
) -> f64 {
    if k == 0 || blocks == 0 || horizon.is_zero() {
        return 0.0;
    }
    let n = k.saturating_add(m);
    let repair_years = repair.as_secs_f64() / YEAR_SECS;
    // Loss rate per year and probability of being in repair, per position.
    let rates: Vec<(f64, f64)> = (0..n)
        .map(|i| {
            let a = effective_availability(positions.get(i)).max(MIN_AVAILABILITY);
            let rate = -a.ln();
            (rate, -(-rate * repair_years).exp_m1())
        })
        .collect();
    let loss_rate: f64 = rates
        .iter()
        .enumerate()
        .filter(|(_, (rate, _))| *rate > 0.0)
        .map(|(i, (rate, _))| {
            let others = rates
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, p))| *p);
            rate * tail_at_least(others, m)
        })
        .sum();
    let p = -(-loss_rate * (horizon.as_secs_f64() / YEAR_SECS)).exp_m1();
    if p.is_nan() { 1.0 } else { p.clamp(0.0, 1.0) }
}

/// A short human figure: "< 1e-9", "3.2e-6", "1.5 %", "12 %".
pub fn describe(probability: f64) -> String {
    let p = probability;
    if p.is_nan() {
        "unknown".to_string()
    } else if p < 1e-9 {
        "< 1e-9".to_string()
    } else if p < 0.01 {
        format!("{p:.1e}")
    } else if p < 0.0995 {
        format!("{:.1} %", p * 100.0)
    } else if p < 0.995 {
        format!("{:.0} %", p * 100.0)
    } else if p < 1.0 {
        "> 99 %".to_string()
    } else {
        "100 %".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600 + 6 * 3600);

    fn seen(availability: f64) -> Observed {
        Observed {
            availability,
            observed: 30 * DAY,
        }
    }

    fn all(n: usize, availability: f64) -> Vec<Observed> {
        vec![seen(availability); n]
    }

    fn year_4_2(availability: f64, repair: Duration) -> f64 {
        loss_probability(4, 2, &all(6, availability), repair, YEAR, 1000)
    }

    fn strictly_decreasing(values: &[f64]) -> bool {
        values.windows(2).all(|w| w[0] > w[1])
    }

    #[test]
    fn better_suppliers_lower_the_risk() {
        let values: Vec<f64> = [0.3, 0.5, 0.8, 0.9, 0.99, 0.999]
            .iter()
            .map(|&a| year_4_2(a, DAY))
            .collect();
        assert!(strictly_decreasing(&values), "{values:?}");
        assert!(values.iter().all(|&p| p > 0.0 && p < 1.0), "{values:?}");
        // One bad supplier among good ones raises it, too.
        let mut mixed = all(6, 0.99);
        let base = loss_probability(4, 2, &mixed, DAY, YEAR, 1);
        mixed[5] = seen(0.5);
        assert!(loss_probability(4, 2, &mixed, DAY, YEAR, 1) > base);
    }

    #[test]
    fn more_parity_lowers_the_risk() {
        let values: Vec<f64> = (0..=4)
            .map(|m| loss_probability(4, m, &all(4 + m, 0.9), DAY, YEAR, 1))
            .collect();
        assert!(strictly_decreasing(&values), "{values:?}");
    }

    #[test]
    fn faster_repair_lowers_the_risk() {
        let values: Vec<f64> = [240, 72, 24, 6, 1]
            .iter()
            .map(|&h| year_4_2(0.9, h * HOUR))
            .collect();
        assert!(strictly_decreasing(&values), "{values:?}");
        // Instant repair: losing a block needs three suppliers lost at the same instant.
        assert_eq!(year_4_2(0.9, Duration::ZERO), 0.0);
    }

    #[test]
    fn no_parity_with_an_unreliable_supplier_is_a_large_risk_whatever_the_repair() {
        // With m = 0 the model is exact: the chance that some supplier is lost within the year.
        let mut positions = all(4, 1.0);
        positions[2] = seen(0.9);
        for repair in [Duration::ZERO, HOUR, 30 * DAY] {
            let p = loss_probability(4, 0, &positions, repair, YEAR, 1);
            assert!((p - 0.1).abs() < 1e-3, "{p}");
        }
        let p = loss_probability(6, 0, &all(6, 0.9), DAY, YEAR, 1);
        assert!((p - (1.0 - 0.9f64.powi(6))).abs() < 1e-3, "{p}");
    }

    #[test]
    fn suppliers_always_reachable_are_never_lost() {
        for m in 0..3 {
            assert_eq!(
                loss_probability(4, m, &all(4 + m, 1.0), 30 * DAY, 10 * YEAR, 1_000_000),
                0.0
            );
        }
    }

    #[test]
    fn the_dynamic_programme_matches_the_closed_form_for_one_plus_one() {
        // k = 1, m = 1: a loss is one position lost while the other is in repair.
        let (a, b) = (0.9f64, 0.7f64);
        let r = 2.0 / 365.25;
        let (la, lb) = (-a.ln(), -b.ln());
        let rate = la * -(-lb * r).exp_m1() + lb * -(-la * r).exp_m1();
        let want = -(-rate).exp_m1();
        let got = loss_probability(1, 1, &[seen(a), seen(b)], 2 * DAY, YEAR, 1);
        assert!(((got - want) / want).abs() < 1e-9, "{got} vs {want}");
        // And the tail directly: at least 2 of (0.5, 0.5, 0.5) is 1/2; at least 0 is 1.
        assert!((tail_at_least([0.5; 3].into_iter(), 2) - 0.5).abs() < 1e-15);
        assert_eq!(tail_at_least([0.3; 4].into_iter(), 0), 1.0);
        assert_eq!(tail_at_least([0.3; 2].into_iter(), 3), 0.0);
    }

    #[test]
    fn a_newly_seen_supplier_leans_on_the_prior() {
        let one = |availability, observed| {
            loss_probability(
                1,
                0,
                &[Observed {
                    availability,
                    observed,
                }],
                DAY,
                YEAR,
                1,
            )
        };
        // Always up for a minute says little; for two days it is taken at its word.
        let minute = one(1.0, Duration::from_secs(60));
        let half_day = one(1.0, 12 * HOUR);
        assert!((minute - 0.1).abs() < 1e-3, "{minute}");
        assert!(half_day > 0.0 && half_day < minute, "{half_day}");
        assert_eq!(one(1.0, 2 * DAY), 0.0);
        // Nothing observed, or no observation at all for a position: the prior.
        assert!((one(0.2, Duration::ZERO) - 0.1).abs() < 1e-3);
        assert_eq!(
            loss_probability(4, 2, &[], DAY, YEAR, 1),
            loss_probability(4, 2, &all(6, 0.9), DAY, YEAR, 1)
        );
    }

    #[test]
    fn the_number_of_blocks_counts_only_when_zero() {
        let one = loss_probability(4, 2, &all(6, 0.8), DAY, YEAR, 1);
        assert_eq!(
            loss_probability(4, 2, &all(6, 0.8), DAY, YEAR, u64::MAX),
            one
        );
        assert_eq!(loss_probability(4, 2, &all(6, 0.8), DAY, YEAR, 0), 0.0);
    }

    #[test]
    fn edge_inputs_give_a_finite_probability() {
        let odd = [
            seen(-3.0),
            seen(7.0),
            seen(f64::NAN),
            seen(f64::INFINITY),
            seen(f64::NEG_INFINITY),
            seen(0.0),
        ];
        let horizons = [Duration::ZERO, HOUR, YEAR, Duration::MAX];
        let repairs = [Duration::ZERO, HOUR, Duration::MAX];
        for (k, m) in [(0, 0), (0, 3), (1, 0), (4, 2), (10, 6)] {
            for positions in [&[][..], &odd[..], &all(20, 0.5)[..]] {
                for &h in &horizons {
                    for &r in &repairs {
                        let p = loss_probability(k, m, positions, r, h, 3);
                        assert!((0.0..=1.0).contains(&p), "{k}+{m} {r:?} {h:?}: {p}");
                    }
                }
            }
        }
        assert_eq!(loss_probability(4, 2, &odd, DAY, Duration::ZERO, 1), 0.0);
        assert_eq!(loss_probability(0, 2, &odd, DAY, YEAR, 1), 0.0);
        // Out of range is clamped: above 1 is always up, below 0 never up.
        assert_eq!(loss_probability(1, 0, &[seen(7.0)], DAY, YEAR, 1), 0.0);
        assert!(loss_probability(1, 0, &[seen(-3.0)], DAY, YEAR, 1) > 0.999);
        // Suppliers never up, kept forever: certain loss.
        assert!(loss_probability(4, 2, &all(6, 0.0), DAY, Duration::MAX, 1) == 1.0);
    }

    #[test]
    fn typical_figures_are_plausible() {
        // 4 + 2 on suppliers reachable 90% of the time, repaired within a day: rare, not zero.
        let p = year_4_2(0.9, DAY);
        assert!(p > 1e-8 && p < 1e-5, "{p}");
    }

    #[test]
    fn describe_is_short() {
        assert_eq!(describe(0.0), "< 1e-9");
        assert_eq!(describe(1e-10), "< 1e-9");
        assert_eq!(describe(3.2e-6), "3.2e-6");
        assert_eq!(describe(0.0032), "3.2e-3");
        assert_eq!(describe(0.015), "1.5 %");
        assert_eq!(describe(0.12), "12 %");
        assert_eq!(describe(0.994), "99 %");
        assert_eq!(describe(0.999), "> 99 %");
        assert_eq!(describe(1.0), "100 %");
        assert_eq!(describe(f64::NAN), "unknown");
    }
}
