//! The plugin's own binary lists and runs the plugin: registration works across crates.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_recipe-erasing"))
}

#[test]
fn list_shows_the_plugin_next_to_the_builtins() {
    let out = bin().arg("list").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("random_erasing"), "{s}");
    assert!(
        s.contains("label_smoothing") && s.contains("progressive_resizing") && s.contains("colout"),
        "{s}"
    );
}

#[test]
fn runs_a_recipe_that_uses_the_plugin_and_scales_its_time() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("r.yaml");
    std::fs::write(
        &recipe,
        "max_duration: 6ba\neval_interval: 6ba\ndata: {name: fashion_mnist_mini, batch_size: 16, train_subset: 64, eval_subset: 32}\n\
         model: {name: small_cnn, channels: [4, 8]}\noptimizer: {name: sgd, lr: 0.05}\nalgorithms:\n  - {name: random_erasing, p: 0.8, value: random, stop: 4ba}\n",
    )
    .unwrap();
    let out = bin()
        .args(["run", recipe.to_str().unwrap(), "-q", "--run-dir"])
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("run/model.safetensors").is_file());
    let show = bin()
        .args(["show", recipe.to_str().unwrap(), "--scale", "0.5"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&show.stdout);
    let row = s
        .lines()
        .find(|l| l.starts_with("algorithms[0].stop"))
        .unwrap_or_default();
    assert!(
        row.contains("scaled") && row.contains("4ba") && row.contains("2ba"),
        "{s}"
    );
}
