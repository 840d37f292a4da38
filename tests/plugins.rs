//! Walks every registered plugin: its example block parses, and every time parameter it holds is
//! exposed to ScaleSchedule through the visitor, with a policy, and scales accordingly.

use recipe_engine::plugin::{PluginConfig, Policy};
use recipe_engine::registry::{registered, Kind, Registration};
use recipe_engine::serde_yaml::Value;
use recipe_engine::Time;
use std::collections::BTreeSet;

// Name every plugin crate so the linker keeps their registrations in this test binary.
use recipe::algorithms as _;
use recipe::callbacks as _;

/// Keys (`a`, `b.c`, `d[1]`) of every string in a YAML tree that reads as a Time.
fn time_keys(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::String(s) if s.parse::<Time>().is_ok() => {
            out.insert(prefix.to_string());
        }
        Value::Mapping(m) => {
            for (k, v) in m {
                let k = k.as_str().unwrap_or_default();
                time_keys(
                    v,
                    &if prefix.is_empty() {
                        k.to_string()
                    } else {
                        format!("{prefix}.{k}")
                    },
                    out,
                );
            }
        }
        Value::Sequence(s) => {
            for (i, v) in s.iter().enumerate() {
                time_keys(v, &format!("{prefix}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn check_kind<C: ?Sized + PluginConfig + 'static>(kind: Kind) -> usize
where
    Registration<C>: recipe_engine::inventory::Collect,
{
    let mut n = 0;
    for reg in recipe_engine::inventory::iter::<Registration<C>> {
        n += 1;
        let block: Value = recipe_engine::serde_yaml::from_str(reg.example).unwrap();
        let mut cfg = (reg.parse)(&block).unwrap_or_else(|e| {
            panic!(
                "{} `{}`: example does not parse: {e}",
                kind.name(),
                reg.name
            )
        });
        let mut in_yaml = BTreeSet::new();
        time_keys(&cfg.to_yaml(), "", &mut in_yaml);
        let mut visited = Vec::new();
        cfg.visit_times(&mut |k: &str, t: &mut Time, p: Policy| {
            visited.push((k.to_string(), *t, p))
        });
        let visited_keys: BTreeSet<String> = visited.iter().map(|v| v.0.clone()).collect();
        assert_eq!(
            visited_keys,
            in_yaml,
            "{} `{}`: every time parameter must be visited (and nothing else)",
            kind.name(),
            reg.name
        );
        // Scale by 0.5 through the visitor: scaled ones halve (except dur), fixed ones stay.
        cfg.visit_times(&mut |_: &str, t: &mut Time, p: Policy| {
            if p == Policy::Scaled {
                *t = t.scaled(0.5)
            }
        });
        let mut after = Vec::new();
        cfg.visit_times(&mut |k: &str, t: &mut Time, _| after.push((k.to_string(), *t)));
        for ((k, before, p), (_, now)) in visited.iter().zip(&after) {
            let want = if *p == Policy::Scaled {
                before.scaled(0.5)
            } else {
                *before
            };
            assert_eq!(*now, want, "{} `{}`.{k}", kind.name(), reg.name);
        }
        // The scaled config still serializes with the new values.
        let mut in_yaml_after = BTreeSet::new();
        time_keys(&cfg.to_yaml(), "", &mut in_yaml_after);
        assert_eq!(in_yaml_after, in_yaml);
    }
    n
}

#[test]
fn every_registered_plugin_exposes_its_time_parameters() {
    let counts = [
        check_kind::<dyn recipe_engine::algorithm::AlgorithmConfig>(Kind::Algorithm),
        check_kind::<dyn recipe_engine::callback::CallbackConfig>(Kind::Callback),
        check_kind::<dyn recipe_engine::schedule::ScheduleConfig>(Kind::Schedule),
        check_kind::<dyn recipe_engine::optim::OptimizerConfig>(Kind::Optimizer),
        check_kind::<dyn recipe_engine::model::ModelConfig>(Kind::Model),
        check_kind::<dyn recipe_engine::data::DatasetConfig>(Kind::Dataset),
    ];
    for (kind, n) in Kind::ALL.iter().zip(counts) {
        assert_eq!(n, registered(*kind).len());
        assert!(n > 0, "no {} registered", kind.name());
    }
    let algos: Vec<_> = registered(Kind::Algorithm).iter().map(|p| p.name).collect();
    for a in ["scale_schedule", "label_smoothing", "progressive_resizing"] {
        assert!(algos.contains(&a), "{algos:?}");
    }
}

#[test]
fn list_prints_every_kind_with_descriptions() {
    let s = recipe::cli::list(false);
    for k in [
        "algorithms:",
        "callbacks:",
        "schedules:",
        "optimizers:",
        "models:",
        "datasets:",
    ] {
        assert!(s.contains(k), "{s}");
    }
    assert!(s.contains("fashion_mnist_mini") && s.contains("Embedded default"));
}
