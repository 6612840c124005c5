//! Renders a machine's table as Graphviz and as a mermaid `stateDiagram-v2`. Pure: the CLI
//! (`bitdust diagrams`) writes the files, a test compares them with the committed ones.
//!
//! Drawn for a person: one edge per pair of states and direction (the rows between them are lines
//! of its label), internal transitions and entry actions written inside the state, choice points
//! as diamonds, timers with the config key their period comes from.

use std::fmt::Write;
use std::time::Duration;

use super::machine::{Label, Machine, Row, To, entry_of, timers_in};

/// Short human form of a timer period: `500ms`, `30s`, `5m`, `1h`.
pub fn format_period(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn row_label<M: Machine>(row: &Row<M>, guard_open: &str, guard_close: &str) -> String {
    let mut label = row.event.name().to_string();
    if let Some(g) = row.guard {
        let _ = write!(label, " {guard_open}{}{guard_close}", g.name());
    }
    if !row.actions.is_empty() {
        let names: Vec<&str> = row.actions.iter().map(|a| a.name()).collect();
        let _ = write!(label, " / {}", names.join(", "));
    }
    label
}

fn actions_text<M: Machine>(actions: &[M::Action]) -> String {
    actions
        .iter()
        .map(|a| a.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Lines written inside a state: its timers, entry actions and internal transitions.
fn state_notes<M: Machine>(state: M::State, guard_open: &str, guard_close: &str) -> Vec<String> {
    let mut notes: Vec<String> = timers_in::<M>(state)
        .map(|t| {
            let period = t
                .config
                .map_or_else(|| format_period(t.period), str::to_string);
            format!("timer {} every {period}", t.timer.name())
        })
        .collect();
    let entry = entry_of::<M>(state);
    if !entry.is_empty() {
        notes.push(format!("entry / {}", actions_text::<M>(entry)));
    }
    for row in M::rows().iter().filter(|r| r.from.contains(&state)) {
        if matches!(row.to, To::Stay) || matches!(row.to, To::State(s) if s == state) {
            notes.push(row_label(row, guard_open, guard_close));
        }
    }
    notes
}

/// The tail of a row's label after its event: ` [guard] / actions`.
fn row_tail<M: Machine>(row: &Row<M>, guard_open: &str, guard_close: &str) -> String {
    let full = row_label(row, guard_open, guard_close);
    full[row.event.name().len()..].to_string()
}

/// Edges between distinct nodes, grouped by (from, to) in order of first appearance: each is
/// drawn once, the rows along it are lines of its label, and rows that differ only in their
/// event share one line (`A | B / actions`).
fn edges<M: Machine>(guard_open: &str, guard_close: &str) -> Vec<(String, String, Vec<String>)> {
    // (from, to) -> [(events, tail)]
    type Lines = Vec<(Vec<&'static str>, String)>;
    let mut grouped: Vec<(String, String, Lines)> = Vec::new();
    let mut add = |from: String, to: String, event: &'static str, tail: String| {
        let lines = match grouped.iter_mut().find(|(f, t, _)| *f == from && *t == to) {
            Some((_, _, lines)) => lines,
            None => {
                grouped.push((from, to, Vec::new()));
                &mut grouped.last_mut().expect("just pushed").2
            }
        };
        match lines.iter_mut().find(|(_, t)| *t == tail) {
            Some((events, _)) if !events.contains(&event) => events.push(event),
            Some(_) => {}
            None => lines.push((vec![event], tail)),
        }
    };
    for row in M::rows() {
        let tail = row_tail(row, guard_open, guard_close);
        for &from in row.from {
            let to = match row.to {
                To::Stay => continue,
                To::State(s) if s == from => continue,
                To::State(s) => s.name().to_string(),
                To::Choose(c) => choice_node(c.name()),
            };
            add(from.name().to_string(), to, row.event.name(), tail.clone());
        }
    }
    let mut out: Vec<(String, String, Vec<String>)> = grouped
        .into_iter()
        .map(|(from, to, lines)| {
            let labels = lines
                .into_iter()
                .map(|(events, tail)| format!("{}{tail}", events.join(" | ")))
                .collect();
            (from, to, labels)
        })
        .collect();
    for choice in M::choices() {
        for (target, when) in choice.targets {
            out.push((
                choice_node(choice.choice.name()),
                target.name().to_string(),
                vec![format!("{guard_open}{when}{guard_close}")],
            ));
        }
    }
    out
}

fn choice_node(name: &str) -> String {
    format!("choice_{name}")
}

/// Graphviz source for one machine.
pub fn dot<M: Machine>() -> String {
    let mut out = String::new();
    let _ = writeln!(out, "// Generated by `bitdust diagrams`; do not edit.");
    let _ = writeln!(out, "digraph {} {{", M::NAME);
    let _ = writeln!(
        out,
        "    label=\"{}: {}\";",
        M::NAME,
        M::ABOUT.replace('"', "'")
    );
    let _ = writeln!(out, "    labelloc=t;");
    let _ = writeln!(out, "    rankdir=LR;");
    let _ = writeln!(
        out,
        "    node [shape=box, style=rounded, fontname=\"Helvetica\"];"
    );
    let _ = writeln!(out, "    edge [fontname=\"Helvetica\", fontsize=10];");
    let _ = writeln!(out, "    __start [shape=point];");
    for &state in M::State::ALL {
        let mut label = state.name().to_string();
        let notes = state_notes::<M>(state, "[", "]");
        if !notes.is_empty() {
            label.push_str("\\n");
            for note in notes {
                let _ = write!(label, "\\n{note}\\l");
            }
        }
        let periph = if M::TERMINAL.contains(&state) {
            ", peripheries=2"
        } else {
            ""
        };
        let _ = writeln!(out, "    {} [label=\"{label}\"{periph}];", state.name());
    }
    for choice in M::choices() {
        let name = choice.choice.name();
        let _ = writeln!(
            out,
            "    {} [shape=diamond, style=\"\", label=\"{name}?\"];",
            choice_node(name)
        );
    }
    let _ = writeln!(out, "    __start -> {};", M::INITIAL.name());
    for (from, to, labels) in edges::<M>("[", "]") {
        let _ = writeln!(
            out,
            "    {from} -> {to} [label=\"{}\"];",
            labels.join("\\n")
        );
    }
    out.push_str("}\n");
    out
}

/// A mermaid `stateDiagram-v2` block (fenced, ready for Markdown) for one machine.
pub fn mermaid<M: Machine>() -> String {
    let mut out = String::new();
    let _ = writeln!(out, "```mermaid");
    let _ = writeln!(out, "stateDiagram-v2");
    for choice in M::choices() {
        let _ = writeln!(
            out,
            "    state {} <<choice>>",
            choice_node(choice.choice.name())
        );
    }
    let _ = writeln!(out, "    [*] --> {}", M::INITIAL.name());
    for (from, to, labels) in edges::<M>("when ", "") {
        let _ = writeln!(out, "    {from} --> {to} : {}", labels.join("<br/>"));
    }
    for &state in M::TERMINAL {
        let _ = writeln!(out, "    {} --> [*]", state.name());
    }
    for &state in M::State::ALL {
        for note in state_notes::<M>(state, "when ", "") {
            let _ = writeln!(out, "    {} : {note}", state.name());
        }
    }
    let _ = writeln!(out, "```");
    out
}

/// One machine's section of `state-diagrams/README.md`.
pub fn markdown_section<M: Machine>() -> String {
    format!(
        "## {}\n\n{}\n\nGraphviz: [`{}.dot`]({}.dot)\n\n{}",
        M::NAME,
        M::ABOUT,
        M::NAME,
        M::NAME,
        mermaid::<M>()
    )
}
