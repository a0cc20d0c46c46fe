//! The notes app against a real MariaDB (`db_router::tier::Instance`): schema migration, the
//! JSON API with valid and invalid input, the HTML page and form, storage going away and
//! coming back. Without MariaDB installed these tests skip with a reason, unless `CI` is set,
//! where that is a failure.

mod common;

use std::time::Duration;

use common::*;
use db_router::tier::{self, Instance, InstanceConfig};

const DB_USER: &str = "notes";
const DB_PASSWORD: &str = "notespw";
const DB_NAME: &str = "notes";

/// A MariaDB instance with a database and an account for the app (Drop removes it all).
async fn mariadb() -> Instance {
    tokio::task::spawn_blocking(|| {
        let instance = Instance::new(InstanceConfig::default()).expect("start mariadbd");
        instance
            .sql(&format!(
                "CREATE DATABASE {DB_NAME}; CREATE USER '{DB_USER}'@'%' IDENTIFIED BY '{DB_PASSWORD}'; \
                 GRANT ALL PRIVILEGES ON {DB_NAME}.* TO '{DB_USER}'@'%';"
            ))
            .expect("create the app account");
        instance
    })
    .await
    .unwrap()
}

fn db_url(instance: &Instance) -> String {
    format!("mysql://{DB_USER}:{DB_PASSWORD}@{}/{DB_NAME}", instance.addr())
}

async fn wait_health(node: &TestNode, what: &str, pred: impl Fn(u16, &str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let response = get(node.addr, "/healthz").await;
        let body = String::from_utf8_lossy(&response.body).into_owned();
        if pred(response.status, &body) {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: still {} {body:?}", response.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post(node: &TestNode, path: &str, content_type: &str, body: &[u8]) -> RawResponse {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    raw(node.addr, &req).await
}

fn json(response: &RawResponse) -> serde_json::Value {
    serde_json::from_slice(&response.body).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&response.body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_page_with_valid_and_invalid_input() {
    if !tier::available_or_skip("api_and_page_with_valid_and_invalid_input") {
        return;
    }
    let db = mariadb().await;
    let url = db_url(&db);
    let node = start_release(&[], |config| config.db_url = Some(url)).await;
    wait_health(&node, "ready", |s, _| s == 200).await;
    assert_eq!(db.value("SELECT MAX(version) FROM notes.schema_version").unwrap(), "2");

    // Valid.
    let created = post(&node, "/api/notes", "application/json", br#"{"author":" Ann ","text":"hello\nworld"}"#).await;
    assert_eq!(created.status, 201, "{:?}", String::from_utf8_lossy(&created.body));
    let note = json(&created);
    let id = note["id"].as_u64().unwrap();
    assert_eq!(note["author"], "Ann");
    assert_eq!(note["text"], "hello\nworld");
    assert_eq!(note["node"], NODE);
    assert_eq!(note["release"], "1.0.0");
    assert!(note["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(created.header("location"), Some(format!("/api/notes/{id}").as_str()));
    let one = get(node.addr, &format!("/api/notes/{id}")).await;
    assert_eq!(one.status, 200);
    assert_eq!(json(&one), note);
    let second = json(&post(&node, "/api/notes", "application/json; charset=utf-8", br#"{"author":"Bob","text":"<b>hi</b> & bye"}"#).await);
    let list = get(node.addr, "/api/notes").await;
    assert_eq!(list.status, 200);
    let list = json(&list);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0], second, "newest first");
    assert_eq!(list[1], note);
    assert_eq!(json(&get(node.addr, "/api/notes?limit=1").await).as_array().unwrap().len(), 1);
    assert_eq!(db.value("SELECT COUNT(*) FROM notes.notes").unwrap(), "2", "stored in MariaDB");

    // Invalid: each gets its status and a reason.
    let long_text = format!(r#"{{"author":"a","text":"{}"}}"#, "x".repeat(2001));
    let huge = format!(r#"{{"author":"a","text":"{}"}}"#, "x".repeat(100_000));
    for (content_type, body, status, reason) in [
        ("application/json", r#"{"author":"a","text":"#, 400, "invalid JSON"),
        ("application/json", "not json", 400, "invalid JSON"),
        ("application/json", r#"{"author":"a"}"#, 400, "missing field `text`"),
        ("application/json", r#"{"author":"a","text":"b","admin":true}"#, 400, "unknown field `admin`"),
        ("application/json", r#"{"author":5,"text":"b"}"#, 400, "invalid type"),
        ("application/json", r#"{"author":"  ","text":"b"}"#, 400, "author must not be empty"),
        ("application/json", r#"{"author":"a","text":""}"#, 400, "text must not be empty"),
        ("application/json", long_text.as_str(), 400, "longer than 2000"),
        ("application/json", huge.as_str(), 413, "larger than"),
        ("text/plain", r#"{"author":"a","text":"b"}"#, 415, "application/json"),
    ] {
        let response = post(&node, "/api/notes", content_type, body.as_bytes()).await;
        assert_eq!(response.status, status, "{body:.60}");
        assert_eq!(response.header("content-type"), Some("application/json"));
        let error = json(&response)["error"].as_str().unwrap().to_owned();
        assert!(error.contains(reason), "{body:.60}: {error}");
    }
    for (path, status) in [("/api/notes/abc", 400), ("/api/notes/-1", 400), ("/api/notes/999999", 404), ("/api/notes?limit=0", 400), ("/api/notes?limit=x", 400), ("/api/notes?evil=1", 400)] {
        let response = get(node.addr, path).await;
        assert_eq!(response.status, status, "{path}");
        assert!(json(&response)["error"].is_string());
    }
    assert_eq!(db.value("SELECT COUNT(*) FROM notes.notes").unwrap(), "2", "nothing invalid was stored");

    // The page and its form.
    let form = post(&node, "/app", "application/x-www-form-urlencoded", b"author=Cy&text=%3Cscript%3Ealert(1)%3C%2Fscript%3E").await;
    assert_eq!(form.status, 303);
    assert_eq!(form.header("location"), Some("/app"));
    let page = get(node.addr, "/app").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(page.header("x-release"), Some("1.0.0"));
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains(&format!("Served by node <b>{NODE}</b>, release <b>1.0.0</b>")), "{html}");
    assert!(html.contains("<b>Cy</b>: &lt;script&gt;alert(1)&lt;/script&gt;"), "{html}");
    assert!(html.contains("&lt;b&gt;hi&lt;/b&gt; &amp; bye"));
    assert!(!html.contains("<script>"));
    let bad_form = post(&node, "/app", "application/x-www-form-urlencoded", b"author=&text=x").await;
    assert_eq!(bad_form.status, 400);
    assert!(String::from_utf8_lossy(&bad_form.body).contains("author must not be empty"));
    node.stop().await.unwrap();

    // A second start on the same database: migrations are not applied twice.
    let url = db_url(&db);
    let node = start_release(&[], |config| config.db_url = Some(url)).await;
    wait_health(&node, "ready again", |s, _| s == 200).await;
    assert_eq!(db.value("SELECT COUNT(*) FROM notes.schema_version").unwrap(), "2");
    assert_eq!(json(&get(node.addr, "/api/notes").await).as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_going_away_makes_the_node_unhealthy_until_it_is_back() {
    if !tier::available_or_skip("storage_going_away_makes_the_node_unhealthy_until_it_is_back") {
        return;
    }
    let mut db = mariadb().await;
    let url = db_url(&db);
    let node = start_release(&[], |config| config.db_url = Some(url)).await;
    wait_health(&node, "ready", |s, _| s == 200).await;
    assert_eq!(post(&node, "/api/notes", "application/json", br#"{"author":"a","text":"before"}"#).await.status, 201);

    let mut db = tokio::task::spawn_blocking(move || {
        db.kill9().unwrap();
        db
    })
    .await
    .unwrap();
    let body = wait_health(&node, "storage down", |s, _| s == 503).await;
    assert!(body.starts_with("storage unreachable: "), "{body}");
    let api = get(node.addr, "/api/notes").await;
    assert_eq!(api.status, 503);
    assert!(json(&api)["error"].as_str().unwrap().starts_with("storage unavailable"));
    assert_eq!(get(node.addr, "/css/site.css").await.status, 200, "static files do not need storage");

    let db = tokio::task::spawn_blocking(move || {
        db.start().unwrap();
        db
    })
    .await
    .unwrap();
    wait_health(&node, "storage back", |s, _| s == 200).await;
    let list = json(&get(node.addr, "/api/notes").await);
    assert_eq!(list[0]["text"], "before");
    drop(db);
}
