//! Redis over TLS (`rediss://`, with and without client certificates) and Redis Cluster,
//! each against real `redis-server` processes: limits stay exact, and a server the gateway
//! cannot authenticate is treated as unreachable, never trusted.

use crate::common;

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{Gateway, client, eventually, redis::Redis};
use serde_json::{Value, json};

const KEY_A: &str = "tg_clusterTestsKeyA000000000000000000000001";
const KEY_B: &str = "tg_clusterTestsKeyB000000000000000000000002";

fn config(dir: &Path, key_rpm: u32, route_rpm: Option<u32>) {
    let route_limit = route_rpm
        .map(|r| format!(", rateLimit: {{requestsPerMinute: {r}}}"))
        .unwrap_or_default();
    let text = format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: mock}}\nspec: {{type: mock, models: [{{name: demo}}], mock: {{completionTokens: 3}}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: demo}}\nspec: {{models: [demo], targets: [{{provider: mock}}]{route_limit}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: a}}\nspec: {{owner: a, limits: {{requestsPerMinute: {key_rpm}}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: a-key}}\nstringData: {{apiKey: {KEY_A}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: b}}\nspec: {{owner: b, limits: {{requestsPerMinute: {key_rpm}}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: b-key}}\nstringData: {{apiKey: {KEY_B}}}\n"
    );
    std::fs::write(dir.join("config.yaml"), text).unwrap();
}

async fn call(gw: &Gateway, key: &str) -> u16 {
    gw.chat_status(key, "demo").await
}

async fn redis_ready(gw: &Gateway) -> Value {
    gw.readyz().await.1["redis"].clone()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs (CI installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost signed by it, and a client certificate.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=Tollgate test CA",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "localhost"), ("client", "gateway")] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

#[tokio::test]
async fn gateways_use_redis_over_tls_and_refuse_servers_they_cannot_verify() {
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let file = |name: &str| certs.path().join(name).to_str().unwrap().to_owned();
    // TLS only, and clients must present a certificate signed by the CA.
    let redis = Redis::start_with(&[
        "--port",
        "0",
        "--tls-port",
        "{port}",
        "--tls-cert-file",
        &file("server.crt"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.crt"),
        "--tls-auth-clients",
        "yes",
    ]);
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 5, None);
    let url = format!("rediss://localhost:{}/", redis.port);
    let start = |extra: &[&str]| {
        let mut args = vec![
            "--resources",
            dir.path().to_str().unwrap(),
            "--redis-url",
            &url,
            "--redis-timeout",
            "500ms",
            "--redis-failure-mode",
            "failClosed",
        ];
        args.extend_from_slice(extra);
        Gateway::start(&args)
    };
    let (ca, cert, key) = (file("ca.crt"), file("client.crt"), file("client.key"));
    let trusted = start(&[
        "--redis-ca-file",
        &ca,
        "--redis-client-cert",
        &cert,
        "--redis-client-key",
        &key,
    ]);
    let no_client_cert = start(&["--redis-ca-file", &ca]);
    let unknown_ca = start(&["--redis-client-cert", &cert, "--redis-client-key", &key]);

    // The limit is exact through TLS: 5 admitted, then refused.
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(call(&trusted, KEY_A).await);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
    assert_eq!(redis_ready(&trusted).await["reachable"], true);

    // The server refuses a client without a certificate, and the gateway refuses a server
    // signed by a CA it does not trust: both fail closed, with 503, never unlimited.
    for gw in [&no_client_cert, &unknown_ca] {
        assert_eq!(call(gw, KEY_B).await, 503);
        assert_eq!(redis_ready(gw).await["reachable"], false);
    }
}

/// Three cluster nodes, each owning a third of the slots.
struct Cluster {
    nodes: Vec<Redis>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<Redis> = (0..3)
            .map(|i| {
                let conf = dir.path().join(format!("nodes-{i}.conf"));
                Redis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    conf.to_str().unwrap(),
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            while !node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "the cluster did not form");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Self { nodes, _dir: dir }
    }

    fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Which node holds `key`.
    fn owner(&self, key: &str) -> u16 {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        let nodes = self.nodes[0].cli(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port: u16 = fields[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
            for range in &fields[8..] {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                if (lo.parse::<u16>().unwrap()..=hi.parse::<u16>().unwrap()).contains(&slot) {
                    return port;
                }
            }
        }
        panic!("no node owns slot {slot}");
    }
}

#[tokio::test]
async fn three_gateways_on_a_redis_cluster_keep_key_and_route_limits_exact() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    // Each key may make 20 requests a minute, the route 30 in all.
    config(dir.path(), 20, Some(30));
    let urls = cluster.urls();
    let gateways: Vec<Gateway> = (0..3)
        .map(|_| {
            Gateway::start(&[
                "--resources",
                dir.path().to_str().unwrap(),
                "--redis-url",
                &urls,
                "--redis-cluster",
                "--redis-timeout",
                "500ms",
                // A cross-slot script or a routing error would show as 503.
                "--redis-failure-mode",
                "failClosed",
            ])
        })
        .collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let url = gateways[i % 3].url("/v1/chat/completions");
        // Key A asks far beyond its own limit: the route units its refused requests
        // reserved must come back for key B.
        let key = if i % 4 == 0 { KEY_B } else { KEY_A };
        tasks.push(tokio::spawn(async move {
            let status = client()
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            (key, status)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert!(
        results.iter().all(|(_, s)| *s == 200 || *s == 429),
        "only admissions and limit refusals: {results:?}"
    );
    // A unit reserved at one scope while the other refused is given back: once the burst
    // is over, sequential requests find every remaining unit of the route.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (i, gw) in gateways.iter().cycle().take(30).enumerate() {
        let key = if i % 2 == 0 { KEY_A } else { KEY_B };
        results.push((key, call(gw, key).await));
    }
    let admitted = |k: &str| {
        results
            .iter()
            .filter(|(key, s)| *key == k && *s == 200)
            .count()
    };
    let (a, b) = (admitted(KEY_A), admitted(KEY_B));
    // Buckets refill continuously: a slow run may legitimately admit a little more.
    let refill = |rpm: f64| (started.elapsed().as_secs_f64() * rpm / 60.0).floor() as usize;
    eprintln!(
        "cluster: key A {a}, key B {b}, route {} (limits 20/20/30) in {:?}",
        a + b,
        started.elapsed()
    );
    assert!(a <= 20 + refill(20.0), "key A overshoot: {a}");
    assert!(b <= 20 + refill(20.0), "key B overshoot: {b}");
    assert!(a + b <= 30 + refill(30.0), "route overshoot: {}", a + b);
    assert!(a + b >= 30, "route units lost: only {} admitted", a + b);
    for gw in &gateways {
        assert_eq!(redis_ready(gw).await["reachable"], true);
    }

    // The key's and the route's state live on the nodes their hash tags map to.
    let key_bucket = cluster.nodes.iter().any(|n| {
        n.cli(&["--scan", "--pattern", "tollgate:v1:{k:*}:rpm"])
            .lines()
            .count()
            > 0
    });
    assert!(key_bucket, "key buckets are stored in the cluster");
    let routes: Vec<(u16, String)> = cluster
        .nodes
        .iter()
        .flat_map(|n| {
            n.cli(&["--scan", "--pattern", "tollgate:v1:{r:*}:rpm"])
                .lines()
                .map(|k| (n.port, k.to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(routes.len(), 1, "one route bucket: {routes:?}");
    assert_eq!(cluster.owner(&routes[0].1), routes[0].0);

    // Usage counters and the shared cache work on the cluster too.
    let counted = eventually(Duration::from_secs(5), || async {
        let total: u64 = cluster
            .nodes
            .iter()
            .flat_map(|n| {
                n.cli(&["--scan", "--pattern", "tollgate:v1:{k:*}:usage:*"])
                    .lines()
                    .map(|k| {
                        n.cli(&["HGET", k, "requests"])
                            .trim()
                            .parse::<u64>()
                            .unwrap_or(0)
                    })
                    .collect::<Vec<_>>()
            })
            .sum();
        // Daily, monthly and total counters each count every answered request.
        total == 3 * (a + b) as u64
    })
    .await;
    assert!(counted, "usage counters count every answered request");
}

#[tokio::test]
async fn revocations_reach_every_gateway_through_a_redis_cluster() {
    let cluster = Cluster::start();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for d in &dirs {
        config(d.path(), 100_000, None);
    }
    // Each gateway is given the seed nodes in a different order, so they subscribe
    // through different nodes.
    let mut urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    let gateways: Vec<Gateway> = dirs
        .iter()
        .map(|d| {
            urls.rotate_left(1);
            Gateway::start(&[
                "--resources",
                d.path().to_str().unwrap(),
                "--redis-url",
                &urls.join(","),
                "--redis-cluster",
                "--reload-interval",
                "100ms",
            ])
        })
        .collect();
    for gw in &gateways {
        assert_eq!(call(gw, KEY_B).await, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(dirs[0].path().join("config.yaml")).unwrap();
    let without = text
        .split("---\n")
        .filter(|doc| !doc.contains("name: b"))
        .collect::<Vec<_>>()
        .join("---\n");
    let started = Instant::now();
    std::fs::write(dirs[0].path().join("config.yaml"), without).unwrap();
    let refused = eventually(Duration::from_secs(5), || async {
        call(&gateways[1], KEY_B).await == 401
    })
    .await;
    let took = started.elapsed();
    assert!(refused, "the other gateway refuses the removed key");
    eprintln!("cluster revocation reached the other gateway in {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(call(&gateways[1], KEY_A).await, 200);
}
