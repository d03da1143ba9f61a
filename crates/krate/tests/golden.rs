//! Golden responses: the corpus in `tests/golden/` holds requests and the exact bytes
//! upstream's kube-apiserver answers them with (status code, content type, body). Each
//! file runs in order against a fresh server; values a server makes up (uids,
//! resourceVersions, times, allocated addresses) are compared as placeholders.

mod common;

use common::TestServer;

/// One request of a corpus file and the answer it must get.
struct Case {
    title: String,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
    code: u16,
    content_type: String,
    expected: String,
}

fn parse(text: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    for block in text.split("\n=== ").skip(1) {
        let mut lines = block.lines();
        let title = lines.next().unwrap_or_default().to_string();
        let (mut request, mut response, mut in_response) = (Vec::new(), Vec::new(), false);
        for line in lines {
            if line.starts_with("< ") {
                in_response = true;
            }
            if in_response {
                response.push(line)
            } else {
                request.push(line)
            }
        }
        let (first, rest) = request.split_first().unwrap_or_else(|| panic!("{title}: no request line"));
        let (method, path) = first.trim_start_matches("> ").split_once(' ').expect("> METHOD PATH");
        let headers = rest
            .iter()
            .filter_map(|l| l.strip_prefix("> ")?.split_once(": "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let body = rest.iter().filter(|l| !l.starts_with("> ")).copied().collect::<Vec<_>>().join("\n");
        let (status, expected) = response.split_first().unwrap_or_else(|| panic!("{title}: no `< CODE TYPE` line"));
        let (code, content_type) = status.trim_start_matches("< ").split_once(' ').expect("< CODE CONTENT-TYPE");
        let expected = expected.iter().take_while(|l| !l.is_empty()).map(|l| format!("{l}\n")).collect();
        cases.push(Case {
            title,
            method: method.into(),
            path: path.into(),
            headers,
            body,
            code: code.parse().expect("a status code"),
            content_type: content_type.into(),
            expected,
        });
    }
    cases
}

/// `text` with the values a server makes up replaced by the corpus's placeholders.
fn placeholders(text: &str) -> String {
    const FIELDS: &[(&str, &str)] = &[
        ("\"uid\":\"", "<uid>"),
        ("\"resourceVersion\":\"", "<rv>"),
        ("\"creationTimestamp\":\"", "<time>"),
        ("\"deletionTimestamp\":\"", "<time>"),
        ("\"time\":\"", "<time>"),
        ("\"clusterIP\":\"", "<ip>"),
        ("\"clusterIPs\":[\"", "<ip>"),
    ];
    let mut out = text.to_string();
    for (opening, placeholder) in FIELDS {
        let mut at = 0;
        while let Some(found) = out[at..].find(opening) {
            let start = at + found + opening.len();
            let end = start + out[start..].find('"').unwrap_or(0);
            out.replace_range(start..end, placeholder);
            at = start + placeholder.len();
        }
    }
    out
}

async fn run_corpus(file: &str) {
    let text = std::fs::read_to_string(format!("{}/tests/golden/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let cases = parse(&text);
    assert!(!cases.is_empty(), "{file} has no cases");
    let server = TestServer::start();
    let client = server.client().await;
    for case in cases {
        let mut request = http::Request::builder().method(case.method.as_str()).uri(&case.path);
        for (name, value) in &case.headers {
            request = request.header(name, value);
        }
        let request = request.body(case.body.clone().into_bytes()).unwrap();
        let response = client.send(request.map(kube::client::Body::from)).await.expect("send");
        let code = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let bytes = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
        let body = placeholders(&String::from_utf8_lossy(&bytes));
        let what = format!("{file}: {} ({} {})", case.title, case.method, case.path);
        assert_eq!((code, content_type.as_str()), (case.code, case.content_type.as_str()), "{what}: {body}");
        assert_eq!(body, case.expected, "{what}");
    }
}

#[test]
fn placeholders_replace_made_up_values_only() {
    assert_eq!(
        placeholders(r#"{"uid":"1-2","name":"x","resourceVersion":"7","time":"2026-01-01T00:00:00Z"}"#),
        r#"{"uid":"<uid>","name":"x","resourceVersion":"<rv>","time":"<time>"}"#
    );
}

#[tokio::test]
async fn configmaps_answer_as_upstream_does() {
    run_corpus("configmaps.txt").await;
}

#[tokio::test]
async fn services_answer_as_upstream_does() {
    run_corpus("services.txt").await;
}

#[tokio::test]
async fn namespaces_answer_as_upstream_does() {
    run_corpus("namespaces.txt").await;
}
