//! Bounded fuzzing of what the API server reads from a request before the registry sees
//! it, run with the unit tests: paths and query strings (list and watch parameters,
//! write and delete options), continue tokens, `Accept` headers and request bodies in
//! JSON, YAML and protobuf. Each input must get an answer (a value or an error), never a
//! panic. Inputs come from a fixed seed (`krate_api::fuzzing`), so a failure repeats;
//! the committed corpus (`fuzz-corpus/`) is run with byte-level mutations of each entry.
//! The same parsers behind a live server are fuzzed over HTTP by `scripts/fuzz-api`.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};
use krate_api::fuzzing::{corpus, with_mutations, Rng};
use krate_api::kinds::Registry;

use crate::auth::User;
use crate::http::route::parse_query;
use crate::http::{delete_options, list_options, negotiate, parse_body, watch, write_options};
use crate::registry::ContinueToken;

const KEYS: &[&str] = &[
    "labelSelector",
    "fieldSelector",
    "limit",
    "continue",
    "resourceVersion",
    "resourceVersionMatch",
    "sendInitialEvents",
    "timeoutSeconds",
    "allowWatchBookmarks",
    "watch",
    "dryRun",
    "fieldValidation",
    "fieldManager",
    "force",
    "gracePeriodSeconds",
    "propagationPolicy",
    "orphanDependents",
    "pretty",
];

const VALUES: &[&str] = &[
    "",
    "0",
    "1",
    "-1",
    "true",
    "false",
    "All",
    "Strict",
    "NotOlderThan",
    "Exact",
    "Orphan",
    "9223372036854775808",
    "a=b",
    "a!=b",
    "x in (a,b)",
    "metadata.name=é",
    "spec.nodeName",
    "%",
    "%zz",
    "%ff",
    "%c3%a9",
    "%00",
    "%2F",
    "+",
    "&",
    "=",
    "日本",
    "\u{1F600}",
    "eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ",
    "kubectl/v1.37",
];

/// A query string of keys and values from the lists above, percent escapes included.
fn query(rng: &mut Rng) -> String {
    (0..rng.below(5))
        .map(|_| format!("{}={}", KEYS[rng.below(KEYS.len())], rng.text(VALUES, 3)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Reads `query` the ways a request does; only the absence of a panic is checked.
fn read_query(registry: &Registry, path: &str, query: &str) {
    let attrs = Arc::new(crate::testing::request(&User::anonymous(), Method::GET, &format!("{path}?{query}")));
    let parsed = parse_query(Some(query));
    let mut headers = HeaderMap::new();
    if let Ok(agent) = HeaderValue::from_str(query) {
        headers.insert(http::header::USER_AGENT, agent);
    }
    for kind in [registry.lookup("", "v1", "pods"), registry.lookup("", "v1", "nodes")].into_iter().flatten() {
        if let Ok(opts) = list_options(kind, &parsed) {
            let _ = watch::start_of(&opts, &parsed);
            if let Some(token) = &opts.continue_token {
                let _ = ContinueToken::decode(token);
            }
        }
    }
    let _ = write_options(&attrs, &parsed, &headers, false);
    let _ = write_options(&attrs, &parsed, &headers, true);
    let _ = delete_options(&parsed, &headers, query.as_bytes());
}

#[test]
fn paths_and_queries_of_any_characters_parse_or_fail() {
    const PATHS: &[&str] = &[
        "/api/v1/namespaces/default/pods",
        "/api/v1/nodes",
        "/apis/apps/v1/namespaces/x/deployments/d/scale",
        "/api/v1/namespaces/%2F/pods/%00",
        "/apis//v1",
        "/api/v1/namespaces/日本/pods/é/log",
        "//",
        "",
    ];
    let registry = Registry::builtin();
    let mut rng = Rng::default();
    for _ in 0..5_000 {
        let path = PATHS[rng.below(PATHS.len())];
        let query = query(&mut rng);
        read_query(&registry, path, &query);
    }
}

#[test]
fn continue_tokens_of_any_content_decode_or_fail() {
    use base64::Engine;
    const PIECES: &[&str] = &[
        "{",
        "}",
        "\"v\":",
        "\"meta.k8s.io/v1\"",
        ",",
        "\"rv\":",
        "-1",
        "99999999999999999999",
        "\"start\":",
        "\"a/\\u0000\"",
        "null",
        "é",
    ];
    let mut rng = Rng::default();
    for _ in 0..5_000 {
        let raw = rng.text(PIECES, 9);
        let token = match rng.below(3) {
            0 => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw),
            1 => base64::engine::general_purpose::STANDARD.encode(&raw),
            _ => raw,
        };
        let _ = ContinueToken::decode(&token);
    }
}

#[test]
fn accept_headers_of_any_characters_negotiate_or_fail() {
    const PIECES: &[&str] = &[
        "application/json",
        "application/vnd.kubernetes.protobuf",
        "application/yaml",
        "*/*",
        "application/*",
        ";as=Table",
        ";v=v1",
        ";g=meta.k8s.io",
        ";as=PartialObjectMetadataList",
        ";q=0.5",
        ";stream=watch",
        ",",
        ";",
        "=",
        " ",
        "é",
    ];
    let mut rng = Rng::default();
    for _ in 0..5_000 {
        let accept = rng.text(PIECES, 6);
        let _ = negotiate::negotiate(Some(&accept), rng.below(2) == 0);
    }
}

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/yaml",
    "application/vnd.kubernetes.protobuf",
    "application/merge-patch+json",
    "application/apply-patch+yaml",
    "text/plain",
];

#[test]
fn bodies_of_any_bytes_decode_or_fail() {
    const PIECES: &[&str] = &[
        "apiVersion: v1\n",
        "kind: Pod\n",
        "metadata:\n",
        "  name: a\n",
        "- ",
        "&a ",
        "*a ",
        "[*a, *a]",
        "{",
        "}",
        "[",
        "]",
        "\"",
        "'",
        ": ",
        "\n",
        "  ",
        "---\n",
        "!!binary ",
        "!!str ",
        "? ",
        "|\n",
        "\t",
        "\u{0}",
        "é",
        "1e999",
    ];
    let mut rng = Rng::default();
    for _ in 0..5_000 {
        let body = rng.text(PIECES, 12);
        let _ = parse_body(CONTENT_TYPES[rng.below(CONTENT_TYPES.len())], body.as_bytes());
    }
}

/// Upstream's YAML decoder refuses documents whose aliases would expand beyond a bound
/// ("excessive aliasing"); this one must too, quickly and without the memory.
#[test]
fn a_yaml_alias_bomb_is_refused() {
    let mut bomb = String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for (name, prev) in ["b", "c", "d", "e", "f", "g", "h", "i"].iter().zip(["a", "b", "c", "d", "e", "f", "g", "h"]) {
        let refs = vec![format!("*{prev}"); 9].join(",");
        bomb.push_str(&format!("{name}: &{name} [{refs}]\n"));
    }
    let err = parse_body("application/yaml", bomb.as_bytes()).expect_err("the alias bomb was expanded");
    assert_eq!(err.code, 400, "{err:?}");
}

#[test]
fn the_corpus_of_queries_and_bodies_parses_or_fails() {
    let registry = Registry::builtin();
    for input in with_mutations(&corpus(include_str!("../fuzz-corpus/queries.txt"), false), 300) {
        read_query(&registry, "/api/v1/namespaces/default/pods", &String::from_utf8_lossy(&input));
    }
    let mut rng = Rng::default();
    for input in with_mutations(&corpus(include_str!("../fuzz-corpus/yaml.txt"), false), 300) {
        let _ = parse_body(CONTENT_TYPES[rng.below(CONTENT_TYPES.len())], &input);
    }
}
