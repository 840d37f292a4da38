//! `recipe plot schedule` through the binary.

mod common;
use common::*;

#[test]
fn plot_schedule_writes_png_and_svg_per_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let r = write_recipe(dir.path(), "t.yaml", TINY);
    let out = dir.path().join("charts/lr");
    let o = run(&[
        "plot",
        "schedule",
        r.to_str().unwrap(),
        "--scales",
        "0.5,1,2",
        "--set",
        "schedule.name=one_cycle",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let png = std::fs::read(out.with_extension("png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let svg = std::fs::read_to_string(out.with_extension("svg")).unwrap();
    assert!(
        svg.contains("scale 2 (16 steps)"),
        "the legend names each scale"
    );
    let o = run(&["plot", "schedule", r.to_str().unwrap(), "--scales", "0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ratio"), "{}", stderr(&o));
}
