//! Property tests of the parsers that read untrusted input: the compact JWS and its JOSE
//! header, JWK sets, the request id and version pin headers, and the endpoints file. For
//! arbitrary input and for random mutations of valid input they must not panic, must
//! refuse oversized or deeply nested input without unbounded work, and must keep their
//! round trips: a token signed here verifies, and no single changed byte of it does.

mod support;

use std::path::Path;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use scorefront::{
    discovery::file::parse_endpoints,
    error::{ClientError, ProxyError},
    metrics::Metrics,
    proxy::{
        headers::{
            MAX_ID_LEN, MODEL_DEPLOYMENT, MS_CLIENT_REQUEST_ID, REQUEST_ID, RequestFields,
            RequestIds,
        },
        slots::VersionSlots,
        table::RoutingTable,
    },
    spec::{self, MAX_VERSIONS},
    token::{
        jwk::{Alg, PublicKey, parse_jwks},
        jws::Jws,
    },
};
use serde_json::{Value, json};
use support::tokens::{TestIssuer, TestKey};

const CASES: u32 = 256;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // Failures are kept as named regression tests below, not in files beside the tests.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
        "[A-Za-z0-9_-]{0,700}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::hash_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The keys of every kind, made once: key generation is the slow part.
fn issuer() -> &'static TestIssuer {
    static ISSUER: std::sync::OnceLock<TestIssuer> = std::sync::OnceLock::new();
    ISSUER.get_or_init(|| TestIssuer::new("https://idp.test", "api://test", "k"))
}

/// The public key of `key` as scorefront reads it from a JWKS.
fn public(key: &TestKey) -> PublicKey {
    let doc = json!({"keys": [key.jwk()]}).to_string();
    let (mut keys, skipped) = parse_jwks(doc.as_bytes()).unwrap();
    assert!(skipped.is_empty(), "{skipped:?}");
    keys.remove(0)
}

/// Whether `token` parses and its signature verifies with `key`.
fn verifies(token: &[u8], key: &PublicKey) -> bool {
    Jws::parse(token).is_ok_and(|jws| key.verify(jws.alg, jws.signed, &jws.signature))
}

const ALGS: [&str; 9] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

// ---------------------------------------------------------------------------------------
// JWS

proptest! {
    #![proptest_config(config())]

    #[test]
    fn jws_parse_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Jws::parse(&bytes);
    }

    #[test]
    fn jws_parse_takes_any_three_base64url_parts(
        h in "[A-Za-z0-9_=-]{0,200}",
        c in "[A-Za-z0-9_=-]{0,200}",
        s in "[A-Za-z0-9_=-]{0,200}",
    ) {
        let _ = Jws::parse(format!("{h}.{c}.{s}").as_bytes());
    }

    #[test]
    fn jws_parse_takes_any_json_header_and_claims(header in json_value(), claims in json_value()) {
        let token = format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        if let Ok(jws) = Jws::parse(token.as_bytes()) {
            // Only an allowed algorithm gets through.
            prop_assert!(ALGS.contains(&jws.alg.name()));
            prop_assert_eq!(Some(jws.alg.name()), header["alg"].as_str());
        }
    }

    /// A token signed here verifies; replacing any one byte of it makes it fail to parse or
    /// to verify.
    #[test]
    fn any_single_changed_byte_breaks_a_signed_token(
        alg in prop::sample::select(&ALGS[..]),
        at in any::<prop::sample::Index>(),
        to in any::<u8>(),
    ) {
        let issuer = issuer();
        let key = issuer.key_for(alg);
        let token = issuer.token(alg);
        let public = public(key);
        prop_assert!(verifies(token.as_bytes(), &public), "{alg}: {token}");
        let mut bad = token.into_bytes();
        let i = at.index(bad.len());
        prop_assume!(bad[i] != to);
        bad[i] = to;
        prop_assert!(!verifies(&bad, &public), "{alg}: byte {i} changed to {to:#x}");
    }

    /// The header and claims of a signed token replaced by any JSON: never verifies.
    #[test]
    fn re_encoded_parts_of_a_signed_token_do_not_verify(
        alg in prop::sample::select(&ALGS[..]),
        claims in json_value(),
    ) {
        let issuer = issuer();
        let token = issuer.token(alg);
        let public = public(issuer.key_for(alg));
        let (header, rest) = token.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let bad = format!("{header}.{}.{sig}", URL_SAFE_NO_PAD.encode(claims.to_string()));
        prop_assert!(!verifies(bad.as_bytes(), &public));
    }
}

#[test]
fn oversized_and_deeply_nested_tokens_are_refused() {
    // Over the size limit: refused before any decoding.
    let big = format!("{}.e30.c2ln", "A".repeat(20_000));
    assert!(Jws::parse(big.as_bytes()).is_err());
    // Nested far past serde_json's recursion limit, within the size limit: skipped without
    // recursion in a member nobody reads, refused in one that is read.
    let depth = 5_000;
    let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let b64 = |s: String| URL_SAFE_NO_PAD.encode(s);
    let ignored = format!(
        "{}.e30.c2ln",
        b64(format!(r#"{{"alg":"ES256","x":{nested}}}"#))
    );
    assert!(ignored.len() < 16 * 1024);
    assert!(Jws::parse(ignored.as_bytes()).is_ok());
    let read = format!(
        "{}.{}.c2ln",
        b64(r#"{"alg":"ES256"}"#.into()),
        b64(format!(r#"{{"aud":{nested}}}"#))
    );
    assert!(read.len() < 16 * 1024);
    assert!(Jws::parse(read.as_bytes()).is_err());
}

// ---------------------------------------------------------------------------------------
// JWK sets

/// Fields a JWK may have, and a few it should not.
const JWK_FIELDS: [&str; 12] = [
    "kty", "crv", "x", "y", "n", "e", "alg", "use", "kid", "k", "d", "key_ops",
];

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parse_jwks_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_jwks(&bytes);
    }

    #[test]
    fn parse_jwks_takes_any_json(doc in json_value()) {
        let _ = parse_jwks(doc.to_string().as_bytes());
        let _ = parse_jwks(json!({"keys": [doc]}).to_string().as_bytes());
    }

    /// A valid JWKS with random fields of its keys changed: never a panic, and every key it
    /// still yields fits its algorithms.
    #[test]
    fn a_jwks_with_random_fields_changed_yields_only_usable_keys(
        changes in prop::collection::vec(
            (0..4usize, prop::sample::select(&JWK_FIELDS[..]), json_value()),
            1..4,
        ),
    ) {
        let mut doc = issuer().jwks();
        for (i, field, value) in &changes {
            doc["keys"][*i][*field] = value.clone();
        }
        let (keys, skipped) = parse_jwks(doc.to_string().as_bytes()).unwrap();
        prop_assert_eq!(keys.len() + skipped.len() <= 4, true);
        for key in &keys {
            let usable = ALGS.iter().filter_map(|a| Alg::parse(a)).any(|a| key.allows(a));
            prop_assert!(usable, "{key:?} allows no algorithm");
        }
    }
}

#[test]
fn deeply_nested_jwks_is_refused() {
    let depth = 100_000;
    let doc = format!(r#"{{"keys":[{}{}]}}"#, "[".repeat(depth), "]".repeat(depth));
    assert!(parse_jwks(doc.as_bytes()).is_err());
}

// ---------------------------------------------------------------------------------------
// Request ids and the version pin

/// Header value bytes as clients can send them: visible ASCII, spaces, tabs and obs-text.
fn header_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![0x20u8..0x7f, Just(b'\t'), 0x80u8..=0xff],
        0..max,
    )
}

fn ep_table() -> RoutingTable {
    let yaml = "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {name: ep}\n\
                spec: {authMode: none, versions: [{name: blue, replicas: ['127.0.0.1:1']}, \
                {name: green, trafficPercentile: 0, replicas: ['127.0.0.1:1']}]}\n";
    let endpoints = parse_endpoints(yaml, Path::new("endpoints.yaml")).unwrap();
    RoutingTable::build(&endpoints, &Metrics::new(), |_, v| {
        VersionSlots::new(&v.name, 1, None)
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn request_ids_are_kept_when_valid_made_when_not_and_long_ones_refused(
        id in prop::option::of(header_bytes(2 * MAX_ID_LEN)),
        client_id in prop::option::of(header_bytes(2 * MAX_ID_LEN)),
    ) {
        let mut headers = HeaderMap::new();
        if let Some(id) = &id {
            headers.insert(REQUEST_ID, HeaderValue::from_bytes(id).unwrap());
        }
        if let Some(c) = &client_id {
            headers.insert(MS_CLIENT_REQUEST_ID, HeaderValue::from_bytes(c).unwrap());
        }
        let too_long = |v: &Option<Vec<u8>>| v.as_ref().is_some_and(|v| v.len() > MAX_ID_LEN);
        match RequestIds::read(&RequestFields::read(&headers)) {
            Err(e) => {
                prop_assert!(too_long(&id) || too_long(&client_id));
                let too_large = matches!(e, ClientError::HeaderTooLarge(_));
                prop_assert!(too_large, "{e:?}");
            }
            Ok(ids) => {
                prop_assert!(!too_long(&id) && !too_long(&client_id));
                let got = ids.request_id.as_bytes();
                let valid = |v: &[u8]| !v.is_empty() && v.iter().all(u8::is_ascii_graphic);
                prop_assert!(valid(got) && got.len() <= MAX_ID_LEN);
                match &id {
                    Some(id) if valid(id) => prop_assert_eq!(got, &id[..]),
                    _ => prop_assert!(uuid::Uuid::parse_str(ids.request_id.to_str().unwrap()).is_ok()),
                }
                prop_assert_eq!(
                    ids.client_request_id.as_ref().map(HeaderValue::as_bytes),
                    client_id.as_deref()
                );
            }
        }
    }

    #[test]
    fn a_pin_picks_the_version_it_names_or_none(
        pin in prop_oneof![
            header_bytes(300),
            Just(b"blue".to_vec()),
            Just(b"green".to_vec()),
            Just(b"BLUE".to_vec()),
            Just(b"blue ".to_vec()),
        ],
    ) {
        let table = ep_table();
        let ep = table.endpoint("ep").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(MODEL_DEPLOYMENT, HeaderValue::from_bytes(&pin).unwrap());
        let pin = headers.get(MODEL_DEPLOYMENT).map(HeaderValue::as_bytes);
        match ep.pick(pin, 0) {
            Ok(v) => prop_assert_eq!(Some(v.name().as_bytes()), pin),
            Err(e) => {
                prop_assert!(pin != Some(b"blue") && pin != Some(b"green"));
                let not_found = matches!(e, ClientError::VersionNotFound { .. });
                prop_assert!(not_found, "{e:?}");
                // The refusal is a well-formed JSON body whatever the bytes were.
                let body = ProxyError::from(e).body();
                let v: Value = serde_json::from_slice(&body).unwrap();
                prop_assert_eq!(&v["error"]["code"], "VersionNotFound");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The endpoints file

/// A valid endpoints document with `values` in its settings, in order.
fn endpoint_yaml(values: &[String]) -> String {
    format!(
        "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {{name: {}}}\n\
         spec:\n  authMode: {}\n  keys: {{primaryKey: {}, secondaryKey: {}}}\n  versions:\n\
         \x20 - {{name: {}, trafficPercentile: {}, isDefault: {}, role: {}, \
         maxConcurrentRequestsPerContainer: {}, maxRequestWaitTimeMs: {}, \
         maxPendingRequests: {}, scoringTimeoutMs: {}, replicas: [{}]}}\n\
         \x20 - {{name: {}, trafficPercentile: {}, command: {}, \
         autoscale: {{minReplicas: {}, maxReplicas: {}, targetUtilization: {}, \
         refreshSeconds: {}, scaleDownDelaySeconds: {}}}}}\n",
        values[0],
        values[1],
        values[2],
        values[3],
        values[4],
        values[5],
        values[6],
        values[7],
        values[8],
        values[9],
        values[10],
        values[11],
        values[12],
        values[13],
        values[14],
        values[15],
        values[16],
        values[17],
        values[18],
        values[19],
        values[20],
    )
}

/// The values of a document that passes.
fn good_values() -> Vec<String> {
    [
        "fraud",
        "key",
        "primary-key-0123456789",
        "secondary-key-0123456789",
        "blue",
        "60",
        "true",
        "control",
        "2",
        "500",
        "10",
        "60000",
        "'127.0.0.1:5001'",
        "green",
        "40",
        "'python3 model.py --port {port}'",
        "1",
        "3",
        "70",
        "1",
        "60",
    ]
    .map(String::from)
    .to_vec()
}

/// YAML scalars and small structures, plausible and not.
fn yaml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        Just("-0".to_string()),
        Just("null".to_string()),
        Just("~".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("[[[[[1]]]]]".to_string()),
        Just("*undefined".to_string()),
        Just("!!binary aGk=".to_string()),
        "[a-z0-9-]{0,70}",
        "'[^'\n]{0,40}'",
        "\"[^\"\\\\\n]{0,40}\"",
        "[ -~]{0,20}",
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_endpoints_file_takes_any_text(text in "(?s).{0,600}") {
        let _ = parse_endpoints(&text, Path::new("endpoints.yaml"));
    }

    /// A valid document with random values in place of some of its settings: never a panic,
    /// and whatever is accepted keeps the spec's invariants.
    #[test]
    fn an_endpoints_file_with_random_values_keeps_the_spec_invariants(
        changes in prop::collection::vec((0..21usize, yaml_value()), 1..4),
    ) {
        let mut values = good_values();
        for (i, v) in changes {
            values[i] = v;
        }
        let yaml = endpoint_yaml(&values);
        let Ok(endpoints) = parse_endpoints(&yaml, Path::new("endpoints.yaml")) else {
            return Ok(());
        };
        for ep in &endpoints {
            prop_assert!(spec::valid_name(&ep.name));
            prop_assert!(ep.versions.len() <= MAX_VERSIONS);
            prop_assert!(ep.versions.iter().map(|v| v.traffic_percentile).sum::<u32>() <= 100);
            prop_assert_eq!(ep.versions.iter().filter(|v| v.is_default).count(), 1);
            for v in &ep.versions {
                prop_assert!(spec::valid_name(&v.name));
                prop_assert!(v.slots_per_replica >= 1);
                prop_assert!(v.scoring_timeout.as_millis() <= u128::from(spec::MAX_SCORING_TIMEOUT_MS));
                if let Some(a) = &v.autoscale {
                    prop_assert!(a.min_replicas <= a.max_replicas);
                }
            }
            let table = RoutingTable::build(&endpoints, &Metrics::new(), |_, v| {
                VersionSlots::new(&v.name, v.slots_per_replica, v.max_pending)
            });
            let ep = table.endpoint(&ep.name).unwrap();
            for roll in 0..100 {
                prop_assert!(ep.pick(None, roll).is_ok());
            }
        }
    }
}

#[test]
fn the_valid_document_of_the_properties_is_accepted() {
    let yaml = endpoint_yaml(&good_values());
    let endpoints = parse_endpoints(&yaml, Path::new("endpoints.yaml")).unwrap();
    assert_eq!(endpoints[0].versions.len(), 2);
}

#[test]
fn alias_bombs_and_deep_nesting_in_the_endpoints_file_are_refused() {
    // Each level doubles the last: 2^30 strings if aliases were expanded.
    let mut bomb = String::from("a: &a0 [\"lol\"]\n");
    for i in 1..=30 {
        bomb += &format!("a{i}: &a{i} [*a{}, *a{}]\n", i - 1, i - 1);
    }
    assert!(parse_endpoints(&bomb, Path::new("endpoints.yaml")).is_err());
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(parse_endpoints(&nested, Path::new("endpoints.yaml")).is_err());
    let nested = "- ".repeat(50_000) + "x";
    assert!(parse_endpoints(&nested, Path::new("endpoints.yaml")).is_err());
}

/// Runs `parse_endpoints` on `text` in a thread, failing the test if it does not return
/// at once (before the fix, some inputs made it loop, allocating without bound).
fn parse_bounded(text: &'static str) -> Result<usize, Vec<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(parse_endpoints(text, Path::new("endpoints.yaml")).map(|e| e.len()));
    });
    rx.recv_timeout(std::time::Duration::from_secs(2))
        .unwrap_or_else(|_| panic!("parse_endpoints did not return for {text:?}"))
}

/// Found by `the_endpoints_file_takes_any_text`: after a YAML syntax error the reader
/// reported the same error for every further document, endlessly.
#[test]
fn a_yaml_syntax_error_ends_the_file_with_one_error() {
    for text in ["a: 1\n\u{b}", "\u{b}", "spec: [\n\u{1}: x\n---\nb: 2\n"] {
        let errors = parse_bounded(text).unwrap_err();
        assert_eq!(errors.len(), 1, "{text:?}: {errors:?}");
        assert!(
            errors[0].starts_with("endpoints.yaml: document 1: "),
            "{errors:?}"
        );
    }
}

/// Found by `an_endpoints_file_with_random_values_keeps_the_spec_invariants`: after an
/// unknown alias, serde_yaml_ng handed out a fragment of the document that made it panic.
#[test]
fn an_unknown_alias_is_an_error_not_a_panic() {
    let text = "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\n\
                metadata: {name: *undefined}\nspec: {authMode: none, versions: []}\n\
                ---\napiVersion: scorefront.io/v1\n";
    let errors = parse_bounded(text).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("unknown anchor"), "{errors:?}");
    // Documents before the broken one are still read and checked.
    let good = "apiVersion: scorefront.io/v1\nkind: ScoringEndpoint\nmetadata: {name: a}\n\
                spec: {authMode: none, versions: [{name: v, replicas: ['127.0.0.1:1']}]}\n---\n";
    let text: &'static str = format!("{good}{text}").leak();
    assert_eq!(parse_bounded(text).unwrap_err().len(), 1);
}
