//! A fresh PostgreSQL database per benchmark round on the local server (trust auth), dropped
//! when the round is done. Shared by the benchmarks through `#[path]`.

fn admin() -> postgres::Client {
    postgres::Client::connect(
        "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
        postgres::NoTls,
    )
    .expect("PostgreSQL on 127.0.0.1:5432")
}

/// Create `{prefix}_{random}`; returns its URL.
pub fn create(prefix: &str) -> String {
    let name = format!("{prefix}_{}", fastrand::u64(..));
    admin()
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create database");
    format!("postgres://postgres@127.0.0.1:5432/{name}")
}

/// Drop the database of a URL from [`create`] (a round's data is not kept).
pub fn drop(url: &str) {
    if let Some(name) = url.strip_prefix("postgres://postgres@127.0.0.1:5432/") {
        let _ = admin().batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    }
}
