//! The command line: `serve`, `migrate`, `config print|check`, `unsubscribe-link`,
//! `deliveries list|replay`, `dead-letters list|replay`, `--version`.

use std::{io::Write, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{ConfigSource, Settings},
    startup::{open_store, Application},
    store::{DeliveryFilter, DeliveryState, ReplayRequest},
    telemetry,
};

#[derive(Debug, Parser)]
#[command(
    name = "subgate",
    version,
    about = "Customer-event and subscription gateway",
    long_about = "subgate takes customer events from the ERP (AMQP), Akinon (HTTP), Loymax (AMQP) and \
                  the service-order hub (HTTP), stores every one durably before acknowledging it, keeps \
                  the customer state, and forwards real changes to marketing providers.\n\n\
                  Configuration: embedded defaults, then --config FILE, then SUBGATE__SECTION__KEY \
                  environment variables (see `subgate config print`)."
)]
pub struct Cli {
    /// TOML file overriding the embedded defaults (only the keys it sets).
    #[arg(
        long,
        short = 'c',
        global = true,
        value_name = "FILE",
        env = "SUBGATE_CONFIG"
    )]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: HTTP API, AMQP consumers and the ingest pipeline.
    Serve,
    /// Apply pending store migrations and exit (safe to run while instances are serving).
    Migrate,
    /// Print a signed one-click unsubscribe URL (RFC 8058) for an address, to put in a
    /// message's List-Unsubscribe header. Needs consent.link_secret.
    UnsubscribeLink {
        /// The email address the link unsubscribes.
        #[arg(long, value_name = "ADDRESS")]
        email: String,
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Inspect the delivery outbox and replay dead deliveries.
    Deliveries {
        #[command(subcommand)]
        action: DeliveriesAction,
    },
    /// Inspect a consumed queue's dead-letter queue and move messages back to the queue.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLettersAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersAction {
    /// List the dead-letter queue's first messages, leaving every one in it (one JSON object
    /// per line with --json).
    List {
        /// A consumed queue (e.g. secom-customer-queue) or its dead-letter queue.
        #[arg(long, value_name = "QUEUE")]
        queue: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to the queue (same body, properties and headers, plus
    /// x-subgate-replayed); each is acked in the dead-letter queue only once the broker
    /// confirmed its copy.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["all", "ids"])))]
    Replay {
        /// A consumed queue (e.g. secom-customer-queue) or its dead-letter queue.
        #[arg(long, value_name = "QUEUE")]
        queue: String,
        /// Every message in the dead-letter queue.
        #[arg(long)]
        all: bool,
        /// The messages with this id (as listed; repeat or list several).
        #[arg(long = "id", value_name = "ID", num_args = 1..)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesAction {
    /// List outbox rows, oldest first (one JSON object per line with --json).
    List {
        /// Only dead rows (same as --state dead).
        #[arg(long)]
        dead: bool,
        /// pending | delivered | dead | superseded
        #[arg(long, conflicts_with = "dead")]
        state: Option<String>,
        #[arg(long, value_name = "NAME")]
        destination: Option<String>,
        /// Rows created since: RFC 3339, YYYY-MM-DD, or a duration back (24h).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Make dead rows pending again (attempts reset, due now); the replay is recorded.
    Replay {
        /// Required: replay the dead rows (the confirmation that this resends them).
        #[arg(long, required = true)]
        dead: bool,
        #[arg(long, value_name = "NAME")]
        destination: Option<String>,
        /// Only rows created since: RFC 3339, YYYY-MM-DD, or a duration back (24h).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print the effective configuration as TOML, secrets redacted.
    Print,
    /// Validate the configuration and exit 0 if it is usable.
    Check,
}

/// Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
pub fn run(cli: Cli) -> ExitCode {
    let settings = match Settings::load(&ConfigSource::from_process(cli.config.clone())) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Config {
            action: ConfigAction::Print,
        } => {
            print!("{}", settings.redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Config {
            action: ConfigAction::Check,
        } => {
            println!("configuration ok");
            ExitCode::SUCCESS
        }
        Command::UnsubscribeLink { email } => match unsubscribe_link(&settings, &email) {
            Ok(url) => {
                println!("{url}");
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("error: {message}");
                ExitCode::from(2)
            }
        },
        Command::Migrate => {
            telemetry::init_logging(&settings.log);
            match open_store(&settings, false).and_then(|s| Ok(s.migrate()?)) {
                Ok(n) => {
                    println!("{n} migration(s) applied");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Deliveries { action } => {
            telemetry::init_logging(&settings.log);
            match deliveries(&settings, action) {
                Ok(()) => ExitCode::SUCCESS,
                Err(CliError::Usage(m)) => {
                    eprintln!("error: {m}");
                    ExitCode::from(2)
                }
                Err(CliError::Failed(e)) => fail(&e),
            }
        }
        Command::DeadLetters { action } => {
            telemetry::init_logging(&settings.log);
            match dead_letters(&settings, action) {
                Ok(()) => ExitCode::SUCCESS,
                Err(CliError::Usage(m)) => {
                    eprintln!("error: {m}");
                    ExitCode::from(2)
                }
                Err(CliError::Failed(e)) => fail(&e),
            }
        }
        Command::Serve => {
            telemetry::init_logging(&settings.log);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => return fail(&e.into()),
            };
            match runtime.block_on(serve(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}

/// `{consent.link_base_url}/u/{token}` for the email address.
pub fn unsubscribe_link(settings: &Settings, email: &str) -> Result<String, String> {
    let secret = settings.consent.link_secret.expose();
    if secret.is_empty() {
        return Err("consent.link_secret is not set (SUBGATE__CONSENT__LINK_SECRET)".into());
    }
    let address = crate::consent::Normaliser::new(&settings.consent.default_region)?
        .address(crate::consent::Channel::Email, email)
        .map_err(|m| format!("--email: {m}"))?;
    let token = crate::sources::consents::sign_link(secret.as_bytes(), &address)
        .ok_or("cannot make the link: the system's random source failed")?;
    Ok(format!(
        "{}/u/{token}",
        settings.consent.link_base_url.trim_end_matches('/')
    ))
}

enum CliError {
    Usage(String),
    Failed(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError::Failed(e.into())
    }
}

fn deliveries(settings: &Settings, action: DeliveriesAction) -> Result<(), CliError> {
    let now = crate::clock::now_ms();
    let since = |t: &Option<String>| {
        t.as_deref()
            .map(|t| crate::delivery::parse_since(t, now))
            .transpose()
            .map_err(|m| CliError::Usage(format!("--since: {m}")))
    };
    // Like `serve`: an upgraded binary may meet a database without the outbox tables yet.
    let store = open_store(settings, settings.store.migrate_on_start)?;
    match action {
        DeliveriesAction::List {
            dead,
            state,
            destination,
            since: from,
            limit,
            json,
        } => {
            let state = match (dead, state.as_deref()) {
                (true, _) => Some(DeliveryState::Dead),
                (false, None) => None,
                (false, Some(s)) => Some(DeliveryState::parse(s).ok_or_else(|| {
                    CliError::Usage(format!(
                        "--state {s:?}: use pending, delivered, dead or superseded"
                    ))
                })?),
            };
            let rows = store.list_deliveries(&DeliveryFilter {
                state,
                destination,
                since: since(&from)?,
                after_id: None,
                limit: limit.max(1),
            })?;
            let mut out = std::io::stdout().lock();
            for row in &rows {
                let line = if json {
                    crate::delivery::row_json(row).to_string()
                } else {
                    format!(
                        "{}\t{}\t{}\t{} attempt(s)\t{}\t{}\t{}\t{}",
                        row.id,
                        row.destination,
                        row.state.as_str(),
                        row.attempts,
                        row.kind,
                        row.entity,
                        crate::clock::to_rfc3339(row.created_at),
                        row.last_error.as_deref().unwrap_or("-"),
                    )
                };
                writeln!(out, "{line}")?;
            }
            if !json {
                writeln!(out, "{} row(s)", rows.len())?;
            }
            Ok(())
        }
        DeliveriesAction::Replay {
            dead: _,
            destination,
            since: from,
        } => {
            let outcome = store.replay_dead(&ReplayRequest {
                destination,
                since: since(&from)?,
                actor: "cli".into(),
                now,
            })?;
            println!(
                "{} dead deliver{} replayed (replay {})",
                outcome.rows,
                if outcome.rows == 1 { "y" } else { "ies" },
                outcome.replay_id
            );
            Ok(())
        }
    }
}

fn dead_letters(settings: &Settings, action: DeadLettersAction) -> Result<(), CliError> {
    use crate::dead_letters::{self as dl, Selection};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match action {
        DeadLettersAction::List { queue, limit, json } => {
            let listing = runtime.block_on(dl::list(settings, &queue, limit.max(1)))?;
            let mut out = std::io::stdout().lock();
            for m in &listing.messages {
                let line = if json {
                    serde_json::to_string(m)?
                } else {
                    format!(
                        "{}\t{}\t{} byte(s)\t{}\t{} replay(s)\t{}",
                        m.id,
                        m.routing_key,
                        m.size,
                        m.timestamp.as_deref().unwrap_or("-"),
                        m.replayed,
                        m.reason.as_deref().unwrap_or("-"),
                    )
                };
                writeln!(out, "{line}")?;
            }
            if !json {
                writeln!(
                    out,
                    "{} message(s) listed of {} in {}",
                    listing.messages.len(),
                    listing.count,
                    listing.dead_letter_queue
                )?;
            }
            Ok(())
        }
        DeadLettersAction::Replay { queue, all, ids } => {
            let selection = if all {
                Selection::All
            } else {
                Selection::Ids(ids.into_iter().collect())
            };
            let outcome = runtime.block_on(dl::replay(settings, &queue, &selection))?;
            println!(
                "{} message(s) moved from {} to {}",
                outcome.moved, outcome.dead_letter_queue, outcome.queue
            );
            if !outcome.not_found.is_empty() {
                eprintln!(
                    "warning: no message with id {} in {}",
                    outcome.not_found.join(", "),
                    outcome.dead_letter_queue
                );
            }
            Ok(())
        }
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    tracing::error!(error = format!("{e:#}"), "fatal");
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = Application::build(settings).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    app.run_until_stopped(shutdown).await
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
