//! The CustomResourceDefinition: `deploy/` holds exactly what `scorefront crd` prints, and
//! its CEL rules refuse what the router would refuse, evaluated by a CEL interpreter as an
//! API server would.

use kube::core::{ObjectMeta, cel::validate_cel};
use scorefront::spec::{self, ScoringEndpoint};

#[test]
fn deploy_holds_the_generated_crd() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/base/crd.yaml");
    let held = std::fs::read_to_string(path).unwrap();
    assert!(
        held == spec::crd_yaml(),
        "deploy/base/crd.yaml differs from the CRD the Rust types make; regenerate it: \
         cargo run -- crd > deploy/base/crd.yaml"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scorefront"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), held);
}

fn object(name: &str, spec: &str) -> ScoringEndpoint {
    ScoringEndpoint {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("models".into()),
            ..ObjectMeta::default()
        },
        spec: serde_yaml_ng::from_str(spec).unwrap(),
        status: None,
    }
}

/// The messages of the rules `spec` breaks.
fn broken(name: &str, spec: &str) -> Vec<String> {
    match validate_cel(&object(name, spec)) {
        Ok(()) => Vec::new(),
        Err(e) => e.to_string().lines().map(str::to_owned).collect(),
    }
}

#[test]
fn cel_rules_refuse_bad_specs_before_any_router_sees_them() {
    let good = "keysSecret: k
versions:
  - {name: blue, service: b, trafficPercentile: 90, isDefault: true, role: control}
  - {name: green, service: g, trafficPercentile: 10}
";
    assert_eq!(broken("fraud", good), Vec::<String>::new());
    assert_eq!(broken("open", "authMode: none"), Vec::<String>::new());
    let cases = [
        (
            "fraud",
            "keysSecret: k\nversions: [{name: a, service: a, trafficPercentile: 60}, \
             {name: b, service: b, trafficPercentile: 41}]",
            "add up to at most 100",
        ),
        (
            "fraud",
            "keysSecret: k\nversions: [{name: a, service: a, isDefault: true}, \
             {name: b, service: b, isDefault: true}]",
            "at most one version may say isDefault",
        ),
        (
            "fraud",
            "keysSecret: k\nversions: [{name: a, service: a, role: control}, \
             {name: b, service: b, role: control}]",
            "at most one version may have role: control",
        ),
        (
            "fraud",
            "keysSecret: k\nversions: [{name: a, service: a}, {name: a, service: b}]",
            "version names must be unique",
        ),
        (
            "fraud",
            "keysSecret: k\nkeys: {primaryKey: aaaaaaaaaaaaaaaaaaaaa}",
            "keys never sit in the resource",
        ),
        ("fraud", "versions: []", "needs keysSecret"),
        (
            "Fraud.v2",
            "authMode: none",
            "the name is the {name} of the scoring URL",
        ),
    ];
    for (name, spec, want) in cases {
        let errs = broken(name, spec);
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "{spec}: want {want:?}, got {errs:#?}"
        );
    }
}
