//! Pure state machines: no async runtime, actors, database, sockets, clock or RNG (`tests/architecture.rs`
//! enforces it). Each machine is a table (`machine::Row`) plus pure logic that turns the table's
//! actions into outputs with data; `actors` runs them, and so does the simulation (`sim`).

pub mod backup_job;
pub mod catalog_commit;
pub mod check;
pub mod diagram;
pub mod fetch;
pub mod fire_hire;
pub mod identity;
pub mod jobs;
pub mod machine;
pub mod monitor;
pub mod network_connector;
pub mod peer_session;
pub mod rebuilder;
pub mod recovery;
pub mod restore_worker;
pub mod supplier_connector;
pub mod supplier_service;
pub mod timers;

pub use machine::{
    ChoiceRow, Ctx, Entry, Instance, Kinded, Label, Machine, NoChoice, Out, Row, Stepped, TimerRow,
    To, row,
};

/// Calls `$f::<M>()` for every machine of the node; diagrams and table tests use it so a new
/// machine is covered by adding it here once.
#[macro_export]
macro_rules! for_each_machine {
    ($f:ident $(, $arg:expr)*) => {{
        $f::<$crate::fsm::identity::IdentityMachine>($($arg),*);
        $f::<$crate::fsm::network_connector::NetworkConnector>($($arg),*);
        $f::<$crate::fsm::peer_session::PeerSession>($($arg),*);
        $f::<$crate::fsm::supplier_service::SupplierService>($($arg),*);
        $f::<$crate::fsm::supplier_connector::SupplierConnector>($($arg),*);
        $f::<$crate::fsm::fire_hire::FireHire>($($arg),*);
        $f::<$crate::fsm::backup_job::BackupJob>($($arg),*);
        $f::<$crate::fsm::restore_worker::RestoreWorker>($($arg),*);
        $f::<$crate::fsm::monitor::Monitor>($($arg),*);
        $f::<$crate::fsm::rebuilder::Rebuilder>($($arg),*);
        $f::<$crate::fsm::jobs::JobQueue>($($arg),*);
    }};
}

/// Every generated diagram file: `(file name, contents)`.
pub fn diagram_files() -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut page = String::from(
        "# State diagrams\n\nGenerated from the transition tables in `src/fsm` by \
         `bitdust diagrams --out state-diagrams`; do not edit by hand. A test fails when these \
         files differ from the code.\n\nEdge labels read `event [guard] / actions`. Timers run \
         periodically while their state lasts.\n\n",
    );
    fn add<M: Machine>(files: &mut Vec<(String, String)>, page: &mut String) {
        files.push((format!("{}.dot", M::NAME), diagram::dot::<M>()));
        page.push_str(&diagram::markdown_section::<M>());
        page.push('\n');
    }
    for_each_machine!(add, &mut files, &mut page);
    files.push(("README.md".into(), page));
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table_is_sound<M: Machine>() {
        let problems = check::table_problems::<M>();
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn every_table_is_sound() {
        for_each_machine!(table_is_sound);
    }

    fn random_walks<M: Machine + Default>(cases: u32) {
        let samples = M::sample_events().len();
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases,
            ..ProptestConfig::default()
        });
        let strategy = proptest::collection::vec(0..samples, 0..60);
        runner
            .run(&strategy, |picks| {
                let all = M::sample_events();
                let events: Vec<M::Event> = picks.iter().map(|&i| all[i].clone()).collect();
                let instance = check::drive(M::default(), &events)
                    .map_err(|v| TestCaseError::fail(v.to_string()))?;
                // Shutdown always ends the machine, whatever came before.
                let mut instance = instance;
                instance.step(
                    &M::shutdown_event(),
                    &Ctx::at(std::time::Duration::from_secs(1_000_000)),
                );
                prop_assert!(instance.is_terminal(), "{} not closed by shutdown", M::NAME);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{}: {e}", M::NAME));
    }

    fn walk<M: Machine + Default>() {
        random_walks::<M>(256);
    }

    #[test]
    fn random_event_sequences_keep_invariants() {
        for_each_machine!(walk);
    }

    /// `state-diagrams/` must be what the code generates.
    #[test]
    fn committed_diagrams_match_the_code() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("state-diagrams");
        let mut stale = Vec::new();
        for (name, contents) in diagram_files() {
            let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
            if on_disk != contents {
                stale.push(name);
            }
        }
        assert!(
            stale.is_empty(),
            "state-diagrams/ is stale ({stale:?}); regenerate with:\n    cargo run -- diagrams --out state-diagrams"
        );
    }
}
