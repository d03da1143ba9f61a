//! Secrets at rest: encrypted by default with a generated key, readable through the API
//! only, rotated online with `krate secrets-encrypt rotate`, and a server started with
//! the wrong key refuses to start rather than serve what it cannot read.

mod common;

use std::process::Command;

use common::TestServer;

const VALUE: &str = "correct-horse-battery-staple";

/// The raw stored value of Secret `default/name`.
fn stored(server: &TestServer, name: &str) -> Vec<u8> {
    let db = rusqlite::Connection::open(server.data_dir().join("db/state.db")).unwrap();
    db.query_row(
        "SELECT l.value FROM kv_current c JOIN kv_log l ON l.rev = c.rev WHERE c.key = ?1",
        [format!("/registry/core/secrets/default/{name}")],
        |row| row.get::<_, Vec<u8>>(0),
    )
    .unwrap()
}

/// Whether any file of the data directory's database holds `needle`.
fn database_holds(server: &TestServer, needle: &str) -> bool {
    std::fs::read_dir(server.data_dir().join("db")).unwrap().any(|entry| {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
    })
}

fn krate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_krate")).args(args).output().unwrap()
}

#[test]
fn secrets_are_stored_encrypted_and_read_back_plain() {
    let server = TestServer::start();
    server.kubectl_ok(&["create", "secret", "generic", "s", &format!("--from-literal=password={VALUE}")]);
    server.kubectl_ok(&["create", "configmap", "c", "--from-literal=marker=visible-in-the-database"]);
    assert!(stored(&server, "s").starts_with(b"k8s:enc:aescbc:v1:key-"));
    let encoded = base64_of(VALUE);
    assert!(!database_holds(&server, VALUE) && !database_holds(&server, &encoded), "no Secret value in the database");
    assert!(
        database_holds(&server, "visible-in-the-database"),
        "the check finds what is there (ConfigMaps are not encrypted)"
    );
    let read = server.kubectl_ok(&["get", "secret", "s", "-o", "jsonpath={.data.password}"]);
    assert_eq!(read, encoded);
}

#[test]
fn rotation_rewrites_every_secret_under_the_new_key() {
    let server = TestServer::start();
    for i in 0..5 {
        server.kubectl_ok(&[
            "create",
            "secret",
            "generic",
            &format!("s{i}"),
            &format!("--from-literal=password={VALUE}"),
        ]);
    }
    let before = stored(&server, "s0");
    // Every Secret: the five, and what the server keeps itself (its join token).
    let secrets = server.kubectl_ok(&["get", "secrets", "-A", "--no-headers"]).lines().count();
    assert!(secrets > 5);
    let data_dir = server.data_dir();
    let out =
        krate(&["secrets-encrypt", "rotate", "--data-dir", data_dir.to_str().unwrap(), "--timeout-seconds", "60"]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("done: {secrets} values rewritten")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let key_of =
        |v: &[u8]| String::from_utf8_lossy(&v[..v.iter().take(60).rposition(|b| *b == b':').unwrap()]).into_owned();
    for i in 0..5 {
        let after = stored(&server, &format!("s{i}"));
        assert_ne!(key_of(&after), key_of(&before), "s{i} is under the new key");
    }
    let read = server.kubectl_ok(&["get", "secret", "s3", "-o", "jsonpath={.data.password}"]);
    assert_eq!(read, base64_of(VALUE));
    // The status file the server reports in says which configuration, not its keys.
    let config = std::fs::read_to_string(data_dir.join("pki/encryption-config.yaml")).unwrap();
    let status_file = std::fs::read_to_string(data_dir.join("pki/encryption-config.yaml.status")).unwrap();
    for line in config.lines().filter_map(|l| l.trim().strip_prefix("secret: ")) {
        assert!(!status_file.contains(line), "the status file must not hold a key");
    }
    let status = krate(&["secrets-encrypt", "status", "--data-dir", data_dir.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("stored values:  all under aescbc:key-"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
}

#[test]
fn a_server_with_the_wrong_key_refuses_to_start() {
    let mut server = TestServer::start();
    server.kubectl_ok(&["create", "secret", "generic", "s", &format!("--from-literal=password={VALUE}")]);
    server.kill();
    let config = server.data_dir().join("pki/encryption-config.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let secret_line = text.lines().find(|l| l.trim_start().starts_with("secret:")).unwrap();
    let other = format!("        secret: {}", base64_of("0123456789abcdef0123456789abcdef"));
    std::fs::write(&config, text.replace(secret_line, &other)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_krate"))
        .args(["server", "--disable-agent", "--port", &common::free_port().to_string(), "--data-dir"])
        .arg(server.data_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A server that did start would run forever: stop it and fail rather than hang.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started with the wrong key");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the server must not start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the key's secret differs from the one that wrote it"), "{err}");
    assert!(err.contains("start with the configuration (and keys) that wrote them"), "{err}");
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}
