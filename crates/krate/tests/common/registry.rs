//! A real container registry (Debian's docker-registry) on a free loopback port, holding
//! krate's test images; stopped on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestRegistry {
    pub address: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts the registry and pushes `busybox` and `test-server` (tags `1`, `latest`).
    pub fn start() -> Self {
        Self::start_as(None)
    }

    /// A registry that wants `user:password` (htpasswd, bcrypt) for pulls and pushes.
    pub fn start_as(credentials: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = super::free_port();
        let address = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let mut yaml = format!("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n", dir.path().join("data").display());
        if let Some((user, password)) = credentials.and_then(|c| c.split_once(':')) {
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{}\n", bcrypt::hash(password, 6).unwrap())).unwrap();
            yaml.push_str(&format!("auth:\n  htpasswd:\n    realm: krate-test\n    path: {}\n", htpasswd.display()));
        }
        std::fs::write(&config, yaml).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .expect("start docker-registry (apt-get install -y docker-registry)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        match credentials {
            None => krate_agent::testimages::push_all(&address).expect("push the test images"),
            Some(c) => krate_agent::testimages::test_server()
                .unwrap()
                .push_as(&address, "test-server", "1", Some(c))
                .expect("push test-server"),
        }
        TestRegistry { address, child, _dir: dir }
    }

    pub fn image(&self, name: &str) -> String {
        format!("{}/{name}:1", self.address)
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
