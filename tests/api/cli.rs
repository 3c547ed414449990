//! The binary's command line: exit codes and one-line errors that name the problem.

use std::process::{Command, Output};

fn subgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_subgate"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("subgate runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn version_prints_the_package_version() {
    let o = subgate(&["--version"], &[]);
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("subgate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn invalid_environment_value_exits_2_naming_the_key_on_one_line() {
    let o = subgate(&["config", "check"], &[("SUBGATE__AMQP__PREFETCH", "lots")]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: config key `amqp.prefetch`"),
        "{err}"
    );
}

#[test]
fn config_flag_is_global_and_print_redacts_secrets() {
    let dir = std::env::temp_dir().join(format!("subgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(
        &file,
        "[amqp]\nurl = \"amqp://app:s3cret@rabbit:5672/%2f\"\nprefetch = 64\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    for args in [
        vec!["--config", path, "config", "print"],
        vec!["config", "print", "--config", path],
    ] {
        let o = subgate(&args, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("prefetch = 64"), "{out}");
        assert!(out.contains("amqp://app:***@rabbit:5672/%2f"), "{out}");
        assert!(!out.contains("s3cret"));
    }
}

#[test]
fn missing_config_file_and_unknown_key_exit_2() {
    let o = subgate(
        &["--config", "/nonexistent/subgate.toml", "config", "check"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/subgate.toml"));

    let o = subgate(&["config", "check"], &[("SUBGATE__AMQP__PREFECH", "1")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("prefech"), "{}", stderr(&o));
}

#[test]
fn migrate_creates_the_schema_and_is_idempotent() {
    let dir = std::env::temp_dir().join(format!("subgate-migrate-{}", fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("m.db").display());
    let env = [("SUBGATE__STORE__URL", url.as_str())];
    let first = subgate(&["migrate"], &env);
    assert!(first.status.success(), "{}", stderr(&first));
    // Every SQLite migration shipped in the tree.
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count();
    assert!(shipped >= 5, "{shipped} migration files");
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).trim(),
        format!("{shipped} migration(s) applied")
    );
    let second = subgate(&["migrate"], &env);
    assert_eq!(
        String::from_utf8_lossy(&second.stdout).trim(),
        "0 migration(s) applied"
    );
}

/// `serve` with `http.addr` already taken, on `store_url`: the error line (stderr also carries
/// the log).
fn serve_with_the_address_taken(store_url: &str) -> (Option<i32>, String) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let o = subgate(
        &["serve"],
        &[
            ("SUBGATE__HTTP__ADDR", addr.as_str()),
            ("SUBGATE__STORE__URL", store_url),
            ("SUBGATE__ERP__ENABLED", "false"),
            ("SUBGATE__LOG__LEVEL", "off"),
        ],
    );
    (o.status.code(), stderr(&o))
}

#[test]
fn startup_failure_after_the_store_is_open_exits_1_with_one_line_on_both_backends() {
    let dir = std::env::temp_dir().join(format!("subgate-cli-addr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sqlite = format!("sqlite://{}", dir.join("s.db").display());
    let postgres = crate::store_conformance::fresh_postgres_database();
    for url in [sqlite.as_str(), postgres.as_str()] {
        let (code, err) = serve_with_the_address_taken(url);
        assert_eq!(code, Some(1), "{url}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{url}: {err}");
        assert!(
            err.starts_with("error: cannot listen on http.addr"),
            "{url}: {err}"
        );
    }
}

#[test]
fn a_missing_sqlite_directory_is_an_error_naming_store_url_and_is_not_created() {
    let parent = std::env::temp_dir().join(format!("subgate-nodir-{}", fastrand::u32(..)));
    std::fs::create_dir_all(&parent).unwrap();
    let missing = parent.join("typo");
    let url = format!("sqlite://{}", missing.join("s.db").display());
    let o = subgate(
        &["migrate"],
        &[
            ("SUBGATE__STORE__URL", url.as_str()),
            ("SUBGATE__LOG__LEVEL", "off"),
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("store.url"), "{err}");
    assert!(
        err.contains(&format!("{} does not exist", missing.display())),
        "{err}"
    );
    assert!(!missing.exists(), "the directory was created");

    // The default, `subgate.db` in the current directory, needs no directory of its own.
    let o = Command::new(env!("CARGO_BIN_EXE_subgate"))
        .arg("migrate")
        .current_dir(&parent)
        .env_remove("SUBGATE__STORE__URL")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(parent.join("subgate.db").is_file());
    std::fs::remove_dir_all(&parent).ok();
}

#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let o = subgate(
        &["migrate"],
        &[
            (
                "SUBGATE__STORE__URL",
                "sqlite:///nonexistent-subgate-dir/s.db",
            ),
            ("SUBGATE__LOG__LEVEL", "info"),
            ("SUBGATE__LOG__FORMAT", "pretty"),
        ],
    );
    let err = stderr(&o);
    // The fatal log line and the error line.
    assert!(err.contains("fatal"), "{err}");
    assert!(!err.contains('\u{1b}'), "{err:?}");
}

#[test]
fn postgresql_notices_are_logged_at_debug_not_info() {
    let url = crate::store_conformance::fresh_postgres_database();
    let env = [
        ("SUBGATE__STORE__URL", url.as_str()),
        ("SUBGATE__LOG__LEVEL", "info"),
    ];
    for _ in 0..2 {
        // The second run meets `schema_migrations` already there: the server sends a NOTICE.
        let o = subgate(&["migrate"], &env);
        let err = stderr(&o);
        assert!(o.status.success(), "{err}");
        assert!(!err.contains("NOTICE"), "{err}");
        assert!(!err.contains("already exists"), "{err}");
    }
    let o = subgate(
        &["migrate"],
        &[
            ("SUBGATE__STORE__URL", url.as_str()),
            (
                "SUBGATE__LOG__LEVEL",
                "subgate::store::postgres::notice=debug",
            ),
        ],
    );
    let err = stderr(&o);
    assert!(
        err.contains("already exists"),
        "at debug the notice is there: {err}"
    );
}

#[test]
fn config_check_rejects_an_unknown_source_in_a_destination_filter_with_a_suggestion() {
    let o = subgate(
        &["config", "check"],
        &[(
            "SUBGATE__DESTINATIONS",
            r#"[{name="crm", kind="webhook", url="https://crm.example.com/h", secret="whsec_c2VjcmV0LW9uZQ==", sources=["akinn"]}]"#,
        )],
    );
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(
            r#"`destinations[0].sources`: unknown source "akinn"; did you mean "akinon"?"#
        ),
        "{err}"
    );
}
