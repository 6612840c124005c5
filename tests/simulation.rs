//! The deterministic simulation (virtual clock, seeded RNG): hiring under loss and delay,
//! partitions, refusals, firing and restarts, with the position invariants checked after every
//! step over many seeds. A failure names its seed.

use std::time::Duration;

use bitdust::fsm::fire_hire;
use bitdust::fsm::supplier_connector as sc;
use bitdust::sim::{Sim, SimConfig};

const GIB: u64 = 1 << 30;
const MIN: Duration = Duration::from_secs(60);

fn invariant(sim: &Sim) -> Result<(), String> {
    sim.check_positions()?;
    sim.check_sessions()
}

/// Node 0 is the customer; nodes 1.. are its friends.
fn world(seed: u64, loss: f64, donated: &[u64]) -> Sim {
    let mut cfg = SimConfig::new(seed);
    cfg.loss = loss;
    cfg.max_delay = Duration::from_millis(800);
    let mut all = vec![0];
    all.extend_from_slice(donated);
    Sim::new(cfg, &all)
}

fn all_hired(sim: &Sim) -> bool {
    sim.slots(0)
        .iter()
        .all(|s| s.is_some_and(|(_, confirmed)| confirmed))
}

#[test]
fn hiring_completes_under_loss_and_delay() {
    for seed in 0..60 {
        let mut sim = world(seed, 0.2, &[4 * GIB; 8]);
        sim.start_customer(0);
        sim.run_until(30 * MIN, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            all_hired(&sim),
            "seed {seed}: not all positions hired: {:?}",
            sim.slots(0)
        );
        assert_eq!(
            sim.fire_hire_state(0),
            Some(fire_hire::State::Ready),
            "seed {seed}"
        );
        assert!(sim.dropped > 0 || seed % 7 != 0 || sim.delivered > 0);
        // Each hired supplier granted the space.
        for (supplier, _) in sim.slots(0).into_iter().flatten() {
            assert_eq!(
                sim.nodes[supplier].service.granted.get(&0),
                Some(&GIB),
                "seed {seed}"
            );
        }
    }
}

#[test]
fn a_supplier_without_space_is_skipped() {
    for seed in 0..20 {
        // Friend 1 donates less than a supplier's share.
        let mut donated = vec![4 * GIB; 7];
        donated[0] = GIB / 2;
        let mut sim = world(seed, 0.0, &donated);
        sim.start_customer(0);
        sim.run_until(10 * MIN, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(all_hired(&sim), "seed {seed}: {:?}", sim.slots(0));
        assert!(
            sim.slots(0).iter().flatten().all(|(s, _)| *s != 1),
            "seed {seed}: the full friend was hired"
        );
    }
}

#[test]
fn partitioned_supplier_disconnects_and_recovers() {
    for seed in 0..30 {
        let mut sim = world(seed, 0.05, &[4 * GIB; 7]);
        sim.start_customer(0);
        sim.run_until(20 * MIN, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(all_hired(&sim), "seed {seed}");
        let (supplier, _) = sim.slots(0)[2].expect("position 2 hired");
        sim.partition(0, supplier);
        let t = sim.now + 5 * MIN;
        sim.run_until(t, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            sim.connector_state(0, 2),
            Some((supplier, sc::State::Disconnected)),
            "seed {seed}"
        );
        // The contract is kept while the supplier is away: no re-hiring.
        assert_eq!(sim.slots(0)[2].map(|s| s.0), Some(supplier), "seed {seed}");
        sim.heal(0, supplier);
        let t = sim.now + 10 * MIN;
        sim.run_until(t, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            sim.connector_state(0, 2),
            Some((supplier, sc::State::Connected)),
            "seed {seed}"
        );
    }
}

#[test]
fn fired_supplier_is_replaced_and_restart_resumes_contracts() {
    for seed in 0..30 {
        let mut sim = world(seed, 0.1, &[4 * GIB; 8]);
        sim.start_customer(0);
        sim.run_until(20 * MIN, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        let before: Vec<usize> = sim.slots(0).iter().flatten().map(|s| s.0).collect();
        let fired = before[1];
        sim.fire(0, 1);
        let t = sim.now + 20 * MIN;
        sim.run_until(t, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(all_hired(&sim), "seed {seed}");
        let after: Vec<usize> = sim.slots(0).iter().flatten().map(|s| s.0).collect();
        assert_ne!(
            after[1], fired,
            "seed {seed}: fired supplier re-hired at once"
        );
        assert_eq!(
            (after[0], &after[2..]),
            (before[0], &before[2..]),
            "seed {seed}: others moved"
        );

        // Restart: the same suppliers, by position, without hiring anyone new.
        sim.stop_customer(0);
        sim.start_customer(0);
        let t = sim.now + 20 * MIN;
        sim.run_until(t, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        let resumed: Vec<usize> = sim.slots(0).iter().flatten().map(|s| s.0).collect();
        assert_eq!(resumed, after, "seed {seed}");
        assert!(all_hired(&sim), "seed {seed}");
    }
}

#[test]
fn random_chaos_keeps_positions_distinct() {
    use rand::{Rng, SeedableRng};
    for seed in 0..100 {
        let mut sim = world(
            seed,
            0.15,
            &[
                3 * GIB,
                GIB / 2,
                4 * GIB,
                4 * GIB,
                2 * GIB,
                4 * GIB,
                4 * GIB,
                4 * GIB,
            ],
        );
        let mut chaos = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
        sim.start_customer(0);
        for _ in 0..30 {
            let peer = chaos.gen_range(1..sim.nodes.len());
            match chaos.gen_range(0..4) {
                0 => sim.partition(0, peer),
                1 => sim.heal(0, peer),
                2 => sim.fire(0, chaos.gen_range(0..6)),
                _ => {}
            }
            let t = sim.now + Duration::from_secs(chaos.gen_range(1..120));
            sim.run_until(t, &invariant)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // Heal everything: hiring completes again.
        for peer in 1..sim.nodes.len() {
            sim.heal(0, peer);
        }
        let t = sim.now + 60 * MIN;
        sim.run_until(t, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(all_hired(&sim), "seed {seed}: {:?}", sim.slots(0));
    }
}

#[test]
fn sessions_survive_loss_and_recover_from_partitions() {
    for seed in 0..30 {
        let mut sim = world(seed, 0.1, &[GIB; 3]);
        sim.run_until(5 * MIN, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        for a in 0..4 {
            for b in 0..4 {
                if a != b {
                    assert!(
                        sim.sees(a, b),
                        "seed {seed}: {a} does not see {b}: {}\n{}",
                        sim.describe_network(a),
                        sim.describe_network(b)
                    );
                }
            }
        }
        // Cut 0 from 2: both ends notice by missed pings; the others stay connected.
        sim.partition(0, 2);
        let t = sim.now + 10 * MIN;
        sim.run_until(t, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !sim.sees(0, 2) && !sim.sees(2, 0),
            "seed {seed}: partition not noticed"
        );
        assert!(sim.sees(0, 1) && sim.sees(1, 2), "seed {seed}: others lost");
        // Heal: redialing with backoff brings the session back.
        sim.heal(0, 2);
        let t = sim.now + 15 * MIN;
        sim.run_until(t, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            sim.sees(0, 2) && sim.sees(2, 0),
            "seed {seed}: not reconnected"
        );
    }
}
