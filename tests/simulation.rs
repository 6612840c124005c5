//! The deterministic simulation (virtual clock, seeded RNG): hiring under loss and delay,
//! partitions, refusals, firing and restarts, with every machine's invariant and the position
//! and session invariants checked after every step over many seeds. A failure names its seed;
//! `BITDUST_SIM_SEED=N` replays that one seed alone. Besides its fixed seeds, every run tries a
//! few fresh ones (printed).

use std::time::Duration;

use bitdust::fsm::fire_hire;
use bitdust::fsm::supplier_connector as sc;
use bitdust::sim::{Checked, Sim, SimConfig};

const GIB: u64 = 1 << 30;
const MIN: Duration = Duration::from_secs(60);

fn invariant(sim: &Sim) -> Checked {
    sim.check_positions()?;
    sim.check_sessions()
}

/// The seeds a test runs: `fixed` known ones plus `fresh` new ones each run, or only the seed
/// named by `BITDUST_SIM_SEED`.
fn seeds(fixed: u64, fresh: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("BITDUST_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        | (1 << 40);
    let new: Vec<u64> = (0..fresh).map(|i| base.wrapping_add(i * 7919)).collect();
    if !new.is_empty() {
        eprintln!("fresh seeds this run: {new:?}");
    }
    (0..fixed).chain(new).collect()
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
    for seed in seeds(60, 2) {
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
    for seed in seeds(20, 1) {
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
    for seed in seeds(30, 1) {
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
    for seed in seeds(30, 1) {
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
    for seed in seeds(100, 2) {
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
    for seed in seeds(30, 1) {
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

/// Simultaneous dials from every side, then restarts whose peers still hold the old sessions
/// (older than the tie-break's window): duplicates are settled without a friend ever going down,
/// and once quiet both ends of every pair use the same connection.
#[test]
fn tie_break_settles_simultaneous_dials_and_restarts() {
    for seed in seeds(500, 4) {
        let mut cfg = SimConfig::new(seed);
        cfg.min_delay = Duration::from_millis(1);
        cfg.max_delay = Duration::from_millis(60);
        let mut sim = Sim::new(cfg, &[GIB; 4]);
        sim.run_until(Duration::from_secs(40), &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        let check = |sim: &Sim, when: &str| {
            sim.check_sessions_agree()
                .unwrap_or_else(|e| panic!("seed {seed}: {when}: {e}"));
            for a in 0..4 {
                for b in 0..4 {
                    assert!(
                        a == b || sim.sees(a, b),
                        "seed {seed}: {when}: {a} does not see {b}: {}",
                        sim.describe_network(a)
                    );
                }
            }
        };
        check(&sim, "after start");
        // Duplicates from simultaneous dials are settled without ever losing the friend.
        assert_eq!(
            sim.peer_downs, 0,
            "seed {seed}: a friend went down at start"
        );
        // A node restarts without closing its sessions: its peers hold old ones until the new
        // dials replace them (or their pong deadline closes them).
        let restarted = (seed % 4) as usize;
        sim.restart_node(restarted, Duration::ZERO);
        let t = sim.now + Duration::from_secs(90);
        sim.run_until(t, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        check(&sim, "after a restart");
        // The old sessions gave way to the new ones at once: no friend was lost meanwhile.
        assert_eq!(
            sim.peer_downs, 0,
            "seed {seed}: a friend went down on a restart"
        );
    }
}

/// A customer whose suppliers restart (their stores reopening slowly), drop it, fail passingly
/// and stop trusting it: it ends with every position held by a supplier that accepted it.
#[test]
fn hiring_survives_supplier_restarts_drops_and_distrust() {
    use rand::{Rng, SeedableRng};
    for seed in seeds(24, 1) {
        let mut sim = world(seed, 0.05, &[4 * GIB; 9]);
        let mut chaos = rand::rngs::StdRng::seed_from_u64(seed ^ 0xfa17);
        // Friend 1 does not trust the customer from the start: it is never hired.
        sim.distrust(1, 0);
        sim.start_customer(0);
        for _ in 0..12 {
            let peer = chaos.gen_range(1..sim.nodes.len());
            match chaos.gen_range(0..4) {
                0 => sim.restart_node(peer, Duration::from_secs(chaos.gen_range(0..20))),
                1 => sim.drop_customer(peer, 0),
                2 => sim.distrust(peer, 0),
                _ => {}
            }
            let t = sim.now + Duration::from_secs(chaos.gen_range(5..90));
            sim.run_until(t, &invariant)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let t = sim.now + 20 * MIN;
        sim.run_until(t, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(all_hired(&sim), "seed {seed}: {:?}", sim.slots(0));
        for (supplier, _) in sim.slots(0).into_iter().flatten() {
            assert!(
                sim.nodes[supplier].service.granted.contains_key(&0),
                "seed {seed}: {supplier} holds a position it never granted"
            );
            assert_ne!(
                supplier, 1,
                "seed {seed}: the friend that never trusted it was hired"
            );
        }
    }
}

/// A supplier whose store is still opening answers with a passing failure: the customer asks
/// again within seconds, not after a whole request timeout.
#[test]
fn a_supplier_still_opening_its_store_costs_seconds_not_a_minute() {
    for seed in seeds(20, 1) {
        let mut sim = world(seed, 0.0, &[4 * GIB; 6]);
        for supplier in 1..=6 {
            sim.restart_node(supplier, Duration::from_secs(3));
        }
        sim.start_customer(0);
        sim.run_until(Duration::from_secs(40), &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(all_hired(&sim), "seed {seed}: {:?}", sim.slots(0));
    }
}

/// The checks are not vacuous: a hand-made violation is reported.
#[test]
fn a_hand_made_violation_is_caught() {
    let mut sim = world(1, 0.0, &[4 * GIB; 6]);
    sim.start_customer(0);
    sim.run_until(10 * MIN, &invariant)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(invariant(&sim).is_ok());
    sim.lose_connector(0, 3);
    let e = invariant(&sim).expect_err("a lost connector must be reported");
    assert!(e.0.contains("is gone"), "{e}");
}

/// A backup job on the production machine: under loss and delay, with a supplier partitioned
/// for a while and another one restarting, it commits, and every block has its fragments on the
/// suppliers of their positions — at least `k` of them, all `k + m` once the absent return.
#[test]
fn backup_job_commits_under_loss_partition_and_restart() {
    use bitdust::fsm::backup_job::{Outcome, State as JobState};
    use rand::{Rng, SeedableRng};
    for seed in seeds(40, 2) {
        let mut sim = world(seed, 0.1, &[4 * GIB; 7]);
        let mut chaos = rand::rngs::StdRng::seed_from_u64(seed ^ 0xb4c4);
        sim.start_customer(0);
        sim.run_until(20 * MIN, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(all_hired(&sim), "seed {seed}");
        let suppliers: Vec<usize> = sim.slots(0).iter().flatten().map(|s| s.0).collect();
        let away = suppliers[chaos.gen_range(0..suppliers.len())];
        let restarting = suppliers[chaos.gen_range(0..suppliers.len())];
        sim.start_backup(0, 30);
        sim.partition(0, away);
        let t = sim.now + Duration::from_secs(chaos.gen_range(1..20));
        sim.run_until(t, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        sim.restart_node(restarting, Duration::from_secs(2));
        let t = sim.now + Duration::from_secs(chaos.gen_range(20..90));
        sim.run_until(t, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        sim.heal(0, away);
        let t = sim.now + 30 * MIN;
        sim.run_until(t, &invariant)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            sim.backup_outcome(0),
            Some(Outcome::Committed),
            "seed {seed}: {:?}",
            sim.backup_state(0)
        );
        assert_eq!(sim.backup_state(0), Some(JobState::Committed));
        let blocks = sim.backup_blocks(0);
        assert_eq!(blocks.len(), 30, "seed {seed}");
        let slots = sim.slots(0);
        for block in &blocks {
            let mut held = 0;
            for (position, slot) in slots.iter().enumerate() {
                let Some((supplier, _)) = slot else { continue };
                if sim.nodes[*supplier]
                    .service
                    .stored
                    .contains(&(0, *block, position as u32))
                {
                    held += 1;
                }
            }
            // The partitioned supplier is back: the committed job drained its outbox to it.
            assert_eq!(
                held, 6,
                "seed {seed}: a block has only {held} fragments placed"
            );
        }
    }
}

/// The restore_worker machine against a simulated set of suppliers and writer, over many seeds:
/// replies arrive in random order, up to `m` suppliers are unreachable or serve forged bytes, the
/// writer consumes blocks in order and sometimes needs an evicted one again. With at most `m` bad
/// suppliers every block decodes and the restore is complete, asking at most `k` + (bad
/// positions) fragments per block; with `m + 1` every block is given up and the restore is partial.
#[test]
fn restore_worker_fetches_k_per_block_and_survives_up_to_m_bad_suppliers() {
    use bitdust::fsm::Machine as _;
    use bitdust::fsm::restore_worker::{Event, Outcome, Output, RestoreWorker};
    use bitdust::fsm::{Ctx, Instance};
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};

    const C: Ctx = Ctx::at(Duration::ZERO);
    for seed in seeds(300, 20) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let count = rng.gen_range(1..25u8);
        let blocks: Vec<[u8; 32]> = (0..count).map(|i| [i; 32]).collect();
        let n_bad = rng.gen_range(0..=3usize);
        let mut positions: Vec<u32> = (0..6).collect();
        positions.shuffle(&mut rng);
        let bad: BTreeSet<u32> = positions[..n_bad].iter().copied().collect();
        let corrupt = rng.gen_bool(0.5);
        // Some bad suppliers are known to be down at the start.
        let down: Vec<u32> = bad.iter().copied().filter(|_| rng.gen_bool(0.5)).collect();
        let mut job = Instance::new(RestoreWorker::with_window(rng.gen_range(1..6)), "sim");
        let mut pending: Vec<Event> = Vec::new();
        let mut asked: BTreeMap<[u8; 32], u32> = BTreeMap::new();
        let mut decoded: BTreeSet<[u8; 32]> = BTreeSet::new();
        let mut given_up: BTreeSet<[u8; 32]> = BTreeSet::new();
        let mut next_needed = 0usize;
        let mut wanted_again = false;
        let mut outcome = None;
        let feed = |job: &mut Instance<RestoreWorker>,
                    event: Event,
                    pending: &mut Vec<Event>,
                    asked: &mut BTreeMap<[u8; 32], u32>,
                    decoded: &mut BTreeSet<[u8; 32]>,
                    given_up: &mut BTreeSet<[u8; 32]>,
                    outcome: &mut Option<Outcome>| {
            let Some(stepped) = job.step(&event, &C) else {
                return;
            };
            job.machine
                .invariant(job.state())
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            for output in stepped.outputs {
                match output {
                    Output::Fetch { block, position } => {
                        *asked.entry(block).or_default() += 1;
                        pending.push(if bad.contains(&position) {
                            Event::FragmentFailed {
                                block,
                                position,
                                corrupt,
                            }
                        } else {
                            Event::FragmentOk { block, position }
                        });
                    }
                    Output::Decode { block } => {
                        decoded.insert(block);
                        pending.push(Event::Decoded { block });
                    }
                    Output::GiveUp { block } => {
                        given_up.insert(block);
                    }
                    Output::Finished(o) => *outcome = Some(o),
                    _ => {}
                }
            }
        };
        let start = Event::Start {
            blocks: blocks.iter().map(|b| (*b, 4, 6)).collect(),
            down,
        };
        feed(
            &mut job,
            start,
            &mut pending,
            &mut asked,
            &mut decoded,
            &mut given_up,
            &mut outcome,
        );
        let mut steps = 0;
        while outcome.is_none() {
            steps += 1;
            assert!(steps < 100_000, "seed {seed}: no progress");
            // The writer takes the next block once it is decoded (or given up).
            if next_needed < blocks.len() {
                let b = blocks[next_needed];
                let ready = decoded.contains(&b)
                    && !pending
                        .iter()
                        .any(|e| matches!(e, Event::Decoded { block } if *block == b));
                if ready || given_up.contains(&b) {
                    next_needed += 1;
                    decoded.remove(&b);
                    let consumed = Event::Consumed { block: b };
                    feed(
                        &mut job,
                        consumed,
                        &mut pending,
                        &mut asked,
                        &mut decoded,
                        &mut given_up,
                        &mut outcome,
                    );
                    // Now and then an evicted block is needed again.
                    if !wanted_again && next_needed > 1 && rng.gen_bool(0.05) {
                        wanted_again = true;
                        next_needed -= 1;
                        let again = Event::Want {
                            block: blocks[next_needed],
                        };
                        feed(
                            &mut job,
                            again,
                            &mut pending,
                            &mut asked,
                            &mut decoded,
                            &mut given_up,
                            &mut outcome,
                        );
                    }
                    continue;
                }
            } else {
                let failed = given_up.len() as u64;
                let done = Event::WriterDone { failed };
                feed(
                    &mut job,
                    done,
                    &mut pending,
                    &mut asked,
                    &mut decoded,
                    &mut given_up,
                    &mut outcome,
                );
                continue;
            }
            if pending.is_empty() {
                // The writer waits for a block nobody fetches: it asks for it.
                let want = Event::Want {
                    block: blocks[next_needed],
                };
                feed(
                    &mut job,
                    want,
                    &mut pending,
                    &mut asked,
                    &mut decoded,
                    &mut given_up,
                    &mut outcome,
                );
                assert!(
                    !pending.is_empty() || given_up.contains(&blocks[next_needed]),
                    "seed {seed}: stuck waiting for block {next_needed}"
                );
                continue;
            }
            // Replies arrive in any order.
            let i = rng.gen_range(0..pending.len());
            let event = pending.swap_remove(i);
            feed(
                &mut job,
                event,
                &mut pending,
                &mut asked,
                &mut decoded,
                &mut given_up,
                &mut outcome,
            );
        }
        if n_bad <= 2 {
            assert_eq!(outcome, Some(Outcome::Complete), "seed {seed}: {n_bad} bad");
            assert!(given_up.is_empty(), "seed {seed}");
            let refetched = usize::from(wanted_again);
            for (block, n) in &asked {
                let once = 4 + bad.len() as u32;
                assert!(
                    *n <= once * (1 + refetched as u32),
                    "seed {seed}: {n} fragments asked for block {}",
                    block[0]
                );
            }
        } else {
            assert_eq!(outcome, Some(Outcome::Partial), "seed {seed}");
            assert_eq!(given_up.len(), blocks.len(), "seed {seed}");
        }
    }
}

/// The restore_worker machine (its fetch plan) against suppliers of which up to `m` are slow: they
/// answer, but only after a minute. On a virtual clock with the machine's one-second progress
/// tick, every slow request is hedged by one more position after the latency bound, so every
/// block decodes from the fast suppliers within a few bounds of its first request, long before any
/// slow answer, and the restore asks at most `k` plus one hedge per slow request for each block.
/// Over many seeds.
#[test]
fn restore_worker_hedges_slow_suppliers_instead_of_waiting_for_them() {
    use bitdust::fsm::Machine as _;
    use bitdust::fsm::restore_worker::{Event, Outcome, Output, RestoreWorker, Timer};
    use bitdust::fsm::{Ctx, Instance};
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use std::cmp::Reverse;
    use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

    const SLOW: Duration = Duration::from_secs(60);
    const BOUND: Duration = Duration::from_secs(5);
    const TICK: Duration = Duration::from_secs(1);
    const FAST: Duration = Duration::from_millis(1500);
    for seed in seeds(200, 10) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let count = rng.gen_range(1..12u8);
        let blocks: Vec<[u8; 32]> = (0..count).map(|i| [i; 32]).collect();
        let n_slow = rng.gen_range(0..=2usize);
        let mut positions: Vec<u32> = (0..6).collect();
        positions.shuffle(&mut rng);
        let slow: BTreeSet<u32> = positions[..n_slow].iter().copied().collect();
        let mut job = Instance::new(
            RestoreWorker::with_window(rng.gen_range(1..5)).hedging_after(BOUND),
            "sim",
        );
        // (delivery time in ms, sequence) -> event.
        let mut queue: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
        let mut events: BTreeMap<u64, Event> = BTreeMap::new();
        let mut seq = 0u64;
        let mut asked: BTreeMap<[u8; 32], BTreeSet<u32>> = BTreeMap::new();
        let mut first_ask: BTreeMap<[u8; 32], u64> = BTreeMap::new();
        let mut decoded: Vec<[u8; 32]> = Vec::new();
        let mut outcome = None;
        let mut now_ms = 0u64;
        let mut next_tick = TICK.as_millis() as u64;
        let mut consumed = 0usize;
        let mut push = |queue: &mut BinaryHeap<Reverse<(u64, u64)>>,
                        events: &mut BTreeMap<u64, Event>,
                        at: u64,
                        event: Event| {
            seq += 1;
            queue.push(Reverse((at, seq)));
            events.insert(seq, event);
        };
        let mut pending = vec![Event::Start {
            blocks: blocks.iter().map(|b| (*b, 4, 6)).collect(),
            down: vec![],
        }];
        let mut finished_at = None;
        let mut steps = 0;
        while outcome.is_none() {
            steps += 1;
            assert!(steps < 200_000, "seed {seed}: no progress");
            for event in std::mem::take(&mut pending) {
                let ctx = Ctx::at(Duration::from_millis(now_ms));
                let Some(stepped) = job.step(&event, &ctx) else {
                    continue;
                };
                job.machine
                    .invariant(job.state())
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                for output in stepped.outputs {
                    match output {
                        Output::Fetch { block, position } => {
                            assert!(
                                asked.entry(block).or_default().insert(position),
                                "seed {seed}: position {position} asked twice"
                            );
                            first_ask.entry(block).or_insert(now_ms);
                            let delay = if slow.contains(&position) {
                                SLOW.as_millis() as u64
                            } else {
                                rng.gen_range(10..FAST.as_millis() as u64)
                            };
                            let ok = Event::FragmentOk { block, position };
                            push(&mut queue, &mut events, now_ms + delay, ok);
                        }
                        Output::Decode { block } => {
                            // Two hedges in a row at most (a hedge may land on the other slow
                            // one), each within the bound plus a tick, then a fast answer.
                            let waited = now_ms - first_ask.get(&block).copied().unwrap_or(now_ms);
                            assert!(
                                Duration::from_millis(waited) < 2 * (BOUND + TICK) + FAST,
                                "seed {seed}: block {} waited {waited} ms with {n_slow} slow",
                                block[0]
                            );
                            decoded.push(block);
                            pending.push(Event::Decoded { block });
                        }
                        Output::GiveUp { block } => panic!("seed {seed}: gave up {block:?}"),
                        Output::Finished(o) => outcome = Some(o),
                        _ => {}
                    }
                }
            }
            if outcome.is_some() {
                break;
            }
            // The writer takes decoded blocks in order.
            while consumed < blocks.len() && decoded.contains(&blocks[consumed]) {
                pending.push(Event::Consumed {
                    block: blocks[consumed],
                });
                consumed += 1;
            }
            if consumed == blocks.len() && finished_at.is_none() {
                finished_at = Some(now_ms);
                pending.push(Event::WriterDone { failed: 0 });
            }
            if !pending.is_empty() {
                continue;
            }
            // The next reply, or the progress tick if it comes first.
            let next_reply = queue.peek().map(|Reverse((at, _))| *at);
            if next_reply.is_none_or(|at| at >= next_tick) {
                now_ms = next_tick;
                next_tick += TICK.as_millis() as u64;
                pending.push(Event::Timeout(Timer::Progress));
            } else if let Some(Reverse((at, id))) = queue.pop() {
                now_ms = at;
                if let Some(event) = events.remove(&id) {
                    pending.push(event);
                }
            }
        }
        assert_eq!(outcome, Some(Outcome::Complete), "seed {seed}");
        assert!(
            finished_at.is_some(),
            "seed {seed}: the writer never finished"
        );
        for (block, positions) in &asked {
            assert!(
                positions.len() <= 4 + n_slow,
                "seed {seed}: {} positions asked for block {} with {n_slow} slow",
                positions.len(),
                block[0]
            );
        }
    }
}

/// The monitor and the rebuilder against a simulated set of friends, over many seeds: friends go
/// down and come back, one may be lost for good, a fire_hire model hires a spare into a fired
/// position. Lists, audits, fetches and placements are answered from what each friend really
/// holds. At every firing decision, every block the fired supplier holds keeps `k` fragments on
/// reachable hired suppliers (no block drops below `k` because of a firing); once the churn ends,
/// every block is back at `k + m` fragments on the hired suppliers.
#[test]
fn monitor_and_rebuilder_keep_k_at_every_firing_and_restore_full_redundancy() {
    use bitdust::crypto::identity::NodeId;
    use bitdust::data::Layout;
    use bitdust::fsm::monitor::{self as mon, AuditResult, BlockInfo, Cell, Monitor};
    use bitdust::fsm::rebuilder::{self as rb, Rebuilder};
    use bitdust::fsm::{Ctx, Instance, Machine as _};
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeSet, VecDeque};

    const K: usize = 4;
    const TOTAL: usize = 6;
    const FRIENDS: usize = 9;
    let id = |n: usize| NodeId::from_signing_key(&[n as u8 + 1; 32]);
    let node_of = |who: NodeId| (0..FRIENDS).find(|n| id(*n) == who).expect("a friend");

    enum To {
        Monitor(mon::Event),
        Rebuilder(rb::Event),
    }

    // Besides the usual seeds, two that once found a replacement lost before its rebuild
    // blocking every later firing.
    for seed in seeds(60, 5).into_iter().chain([259_098_228, 386_569_428]) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let blocks: Vec<[u8; 32]> = (0..rng.gen_range(1..12u8)).map(|i| [i; 32]).collect();
        let mut up = [true; FRIENDS];
        let mut lost = [false; FRIENDS];
        let mut hired: Vec<Option<usize>> = (0..TOTAL).map(Some).collect();
        let mut disk: Vec<BTreeSet<([u8; 32], u32)>> = vec![BTreeSet::new(); FRIENDS];
        for b in &blocks {
            for (p, held) in disk.iter_mut().enumerate().take(TOTAL) {
                held.insert((*b, p as u32));
            }
        }
        let mut monitor = Instance::new(
            Monitor::new(Duration::from_secs(20), Duration::from_secs(60), 3, 3),
            "sim",
        );
        let mut rebuilder = Instance::new(Rebuilder::new(rng.gen_range(1..4)), "sim");
        let mut queue: VecDeque<To> = VecDeque::new();
        queue.push_back(To::Rebuilder(rb::Event::Start));
        let layout = Layout::new(K as u8, (TOTAL - K) as u8).expect("valid");
        queue.push_back(To::Monitor(mon::Event::Start {
            layout,
            blocks: blocks
                .iter()
                .map(|b| BlockInfo {
                    id: *b,
                    layout,
                    holders: (0..TOTAL).map(|p| Some(id(p))).collect(),
                    cells: vec![Cell::Unknown; TOTAL],
                    newest: 1,
                    catalog: b[0] == 0,
                })
                .collect(),
            suppliers: (0..TOTAL).map(|p| Some(id(p))).collect(),
        }));
        for p in 0..TOTAL {
            queue.push_back(To::Monitor(mon::Event::Position {
                position: p as u32,
                supplier: id(p),
                up: true,
            }));
        }
        let mut kills = 0;
        let mut firings = 0;
        let churn_until = Duration::from_secs(3000);
        let end = Duration::from_secs(9000);
        let mut now = Duration::ZERO;
        while now < end {
            now += Duration::from_secs(1);
            let ctx = Ctx {
                now,
                wall: now,
                random: rng.r#gen(),
            };
            // Churn: a friend goes down or comes back; rarely one is lost for good (one at most:
            // with a firing in progress — the fired one's fragments are gone until rebuilt —
            // that is `m` = 2 losses at once; a second loss for good then could take a block
            // below `k` whatever the monitor decides, and the liveness check below would fail for
            // reasons no firing caused).
            if now < churn_until && rng.gen_bool(0.02) {
                let n = rng.gen_range(0..FRIENDS);
                if !lost[n] {
                    if kills < 1 && rng.gen_bool(0.1) {
                        kills += 1;
                        lost[n] = true;
                        up[n] = false;
                        disk[n].clear();
                    } else {
                        up[n] = !up[n];
                    }
                    if let Some(p) = hired.iter().position(|h| *h == Some(n)) {
                        queue.push_back(To::Monitor(mon::Event::Position {
                            position: p as u32,
                            supplier: id(n),
                            up: up[n],
                        }));
                    }
                }
            }
            if now == churn_until {
                for n in 0..FRIENDS {
                    if !lost[n] && !up[n] {
                        up[n] = true;
                        if let Some(p) = hired.iter().position(|h| *h == Some(n)) {
                            queue.push_back(To::Monitor(mon::Event::Position {
                                position: p as u32,
                                supplier: id(n),
                                up: true,
                            }));
                        }
                    }
                }
            }
            let spares = (0..FRIENDS)
                .filter(|n| up[*n] && !hired.contains(&Some(*n)))
                .count();
            queue.push_back(To::Monitor(mon::Event::Spares(spares)));
            while let Some(t) = monitor.due_timer(now) {
                queue.push_back(To::Monitor(Monitor::timer_event(t)));
            }
            while let Some(t) = rebuilder.due_timer(now) {
                queue.push_back(To::Rebuilder(Rebuilder::timer_event(t)));
            }
            // Everything queued is answered within this second, in order.
            let mut budget = 100_000;
            while let Some(next) = queue.pop_front() {
                budget -= 1;
                assert!(budget > 0, "seed {seed}: no quiescence");
                match next {
                    To::Monitor(event) => {
                        let Some(s) = monitor.step(&event, &ctx) else {
                            continue;
                        };
                        monitor
                            .machine
                            .invariant(monitor.state())
                            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                        for o in s.outputs {
                            match o {
                                mon::Output::List {
                                    position,
                                    supplier,
                                    at_most,
                                } => {
                                    let n = node_of(supplier);
                                    // An honest supplier's list is never refused as too long.
                                    assert!(
                                        disk[n].len() <= at_most,
                                        "seed {seed}: {} held, lists bounded at {at_most}",
                                        disk[n].len()
                                    );
                                    let held = up[n].then(|| {
                                        disk[n]
                                            .iter()
                                            .filter(|(_, p)| *p == position)
                                            .map(|(b, _)| *b)
                                            .collect()
                                    });
                                    queue.push_back(To::Monitor(mon::Event::Listed {
                                        position,
                                        supplier,
                                        held,
                                    }));
                                }
                                mon::Output::Audit {
                                    block,
                                    position,
                                    supplier,
                                } => {
                                    let n = node_of(supplier);
                                    let result = if !up[n] {
                                        AuditResult::NoAnswer
                                    } else if disk[n].contains(&(block, position)) {
                                        AuditResult::Passed
                                    } else {
                                        AuditResult::NotFound
                                    };
                                    queue.push_back(To::Monitor(mon::Event::Audited {
                                        block,
                                        position,
                                        supplier,
                                        result,
                                    }));
                                }
                                mon::Output::Fire { position, .. } => {
                                    firings += 1;
                                    let p = position as usize;
                                    let fired = hired[p];
                                    // The invariant: what the fired one holds stays rebuildable.
                                    for b in &blocks {
                                        let held_there = fired
                                            .is_some_and(|n| disk[n].contains(&(*b, position)));
                                        let reachable = (0..TOTAL)
                                            .filter(|q| *q != p)
                                            .filter(|q| {
                                                hired[*q].is_some_and(|n| {
                                                    up[n] && disk[n].contains(&(*b, *q as u32))
                                                })
                                            })
                                            .count();
                                        assert!(
                                            !held_there || reachable >= K,
                                            "seed {seed}: firing position {p} leaves block {} with {reachable} reachable fragments",
                                            b[0]
                                        );
                                    }
                                    // fire_hire: a spare that is up takes the position.
                                    let spare =
                                        (0..FRIENDS).find(|n| up[*n] && !hired.contains(&Some(*n)));
                                    hired[p] = spare;
                                    if let Some(n) = spare {
                                        queue.push_back(To::Monitor(mon::Event::Position {
                                            position,
                                            supplier: id(n),
                                            up: true,
                                        }));
                                    }
                                }
                                mon::Output::Rebuild(work) => {
                                    queue.push_back(To::Rebuilder(rb::Event::Work(work)));
                                }
                                mon::Output::SaveCells(_) | mon::Output::Report(_) => {}
                            }
                        }
                    }
                    To::Rebuilder(event) => {
                        let Some(s) = rebuilder.step(&event, &ctx) else {
                            continue;
                        };
                        rebuilder
                            .machine
                            .invariant(rebuilder.state())
                            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                        for o in s.outputs {
                            match o {
                                rb::Output::Fetch {
                                    block,
                                    position,
                                    supplier,
                                } => {
                                    let n = node_of(supplier);
                                    let ok = up[n] && disk[n].contains(&(block, position));
                                    queue.push_back(To::Rebuilder(if ok {
                                        rb::Event::FragmentOk { block, position }
                                    } else {
                                        rb::Event::FragmentFailed { block, position }
                                    }));
                                }
                                rb::Output::Rebuild { block, targets, .. } => {
                                    let mut placed = Vec::new();
                                    let mut failed = Vec::new();
                                    for (p, s) in targets {
                                        let n = node_of(s);
                                        if up[n] {
                                            disk[n].insert((block, p));
                                            placed.push((p, s));
                                        } else {
                                            failed.push(p);
                                        }
                                    }
                                    queue.push_back(To::Rebuilder(rb::Event::Done {
                                        block,
                                        placed,
                                        failed,
                                    }));
                                }
                                rb::Output::Placed {
                                    block,
                                    position,
                                    supplier,
                                } => queue.push_back(To::Monitor(mon::Event::Placed {
                                    block,
                                    position,
                                    supplier,
                                })),
                                rb::Output::Finished { .. } => {
                                    queue.push_back(To::Monitor(mon::Event::RebuildIdle))
                                }
                                rb::Output::Forget { .. } | rb::Output::Progress(_) => {}
                            }
                        }
                    }
                }
            }
        }
        // After the churn: every position hired and every block whole there.
        for (p, h) in hired.iter().enumerate() {
            let n = h.unwrap_or_else(|| panic!("seed {seed}: position {p} empty"));
            for b in &blocks {
                assert!(
                    disk[n].contains(&(*b, p as u32)),
                    "seed {seed}: block {} missing at position {p} ({kills} lost, {firings} firings)",
                    b[0]
                );
            }
        }
        if kills > 0 {
            assert!(
                firings >= kills,
                "seed {seed}: {kills} lost, {firings} fired"
            );
        }
    }
}
