//! The stdio transport: Portcullis runs the MCP server as a child process and
//! stands in its place on stdin/stdout, so it drops into any MCP client's
//! `command`. One thread per direction reads newline-delimited frames and
//! hands them to the [`Relay`]; stdio pipes block anyway, and policies thus
//! never run inside an async runtime. It owns the child's lifecycle: the
//! server's stderr passes through, EOF on either side shuts down cleanly (the
//! server's stdin is closed, then it gets a grace period, then it is killed),
//! the child's exit status becomes Portcullis' own, and the child is reaped.

mod survey;

use crate::audit::AccessRecord;
use crate::config::Config;
use crate::contract::{Agent, Direction};
use crate::protocol::framing::{Frame, FrameReader};
use crate::protocol::jsonrpc::{self, Message};
use crate::relay::Relay;
use crate::relay::generation::{Current, Generation};
use crate::relay::session::Session;
use crate::runtime::reload::Reloader;
use crate::runtime::status::Status;
use crate::upstream::process::ServerCommand;
use anyhow::{Context, Result, bail};
use signal_hook::consts::{SIGINT, SIGTERM};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use survey::Survey;

/// How long the server may take to exit after its stdin closes before it is
/// killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// How long the server's last output may take to be relayed after it exited
/// (longer only if something else holds its stdout open).
const DRAIN: Duration = Duration::from_secs(2);

/// What ends a proxy session.
enum Ending {
    ClientClosed,
    ServerClosed,
    Signal(i32),
    /// A relay thread failed (a bug): the proxy stops rather than carry on
    /// with one direction deaf.
    Failed(String),
}

/// How long a client's first tool call waits for Portcullis' own first
/// listing of the server's tools.
const FIRST_LISTING_WAIT: Duration = Duration::from_secs(10);

/// The exit code of a proxy whose relay thread failed (EX_SOFTWARE).
const FAILED: i32 = 70;

/// One side's input stream, shared by the two directions' threads; `None`
/// once closed.
struct Outlet(Mutex<Option<Box<dyn Write + Send>>>);

impl Outlet {
    fn new(writer: impl Write + Send + 'static) -> Self {
        Self(Mutex::new(Some(Box::new(writer))))
    }

    /// Writes one frame and a newline; false once the stream is gone.
    fn send(&self, mut frame: Vec<u8>) -> bool {
        frame.push(b'\n');
        let mut guard = self.0.lock().expect("outlet lock poisoned");
        let Some(writer) = guard.as_mut() else {
            return false;
        };
        if writer
            .write_all(&frame)
            .and_then(|()| writer.flush())
            .is_err()
        {
            *guard = None;
            return false;
        }
        true
    }

    /// Closes the stream, so the reader on the other end sees EOF.
    fn close(&self) {
        self.0.lock().expect("outlet lock poisoned").take();
    }
}

/// Runs the proxy on this process' stdin/stdout until either side ends, and
/// returns the exit code to leave with (the server's).
pub fn run(relay: Arc<Relay>, server: &ServerCommand, max_message_bytes: usize) -> Result<i32> {
    let mut child = Command::new(&server.program)
        .args(&server.args)
        .envs(&server.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start MCP server '{}'", server.program))?;
    let to_server = Arc::new(Outlet::new(
        child.stdin.take().context("no stdin pipe to the server")?,
    ));
    let from_server = child
        .stdout
        .take()
        .context("no stdout pipe from the server")?;
    let to_client = Arc::new(Outlet::new(std::io::stdout()));
    let (endings, ending) = mpsc::channel();
    let survey = Arc::new(Survey::default());

    let pumps = [
        (Direction::ClientToServer, Ending::ClientClosed),
        (Direction::ServerToClient, Ending::ServerClosed),
    ];
    let mut from_server = Some(from_server);
    for (direction, ended) in pumps {
        let (relay, endings, survey) = (relay.clone(), endings.clone(), survey.clone());
        let (onward, back) = match direction {
            Direction::ClientToServer => (to_server.clone(), to_client.clone()),
            Direction::ServerToClient => (to_client.clone(), to_server.clone()),
        };
        let input: Box<dyn BufRead + Send> = match direction {
            Direction::ClientToServer => Box::new(BufReader::new(std::io::stdin())),
            Direction::ServerToClient => Box::new(BufReader::new(
                from_server.take().expect("one server reader"),
            )),
        };
        std::thread::Builder::new()
            .name(format!("portcullis-{}", direction.as_str()))
            .spawn(move || {
                let pumped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let sides = Sides { onward, back };
                    pump(&relay, &survey, direction, input, max_message_bytes, sides);
                }));
                let ending = match pumped {
                    Ok(()) => ended,
                    Err(panic) => Ending::Failed(format!(
                        "the {} relay thread failed: {}",
                        direction.as_str(),
                        panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default()
                    )),
                };
                let _ = endings.send(ending);
            })
            .context("cannot start a relay thread")?;
    }
    watch_signals(endings)?;

    let status = match ending.recv().expect("relay threads report their end") {
        Ending::ServerClosed => wait_with_grace(&mut child)?,
        Ending::ClientClosed => {
            relay.cancel_held("the client went away");
            to_server.close();
            let status = wait_with_grace(&mut child)?;
            drain(&ending);
            status
        }
        Ending::Signal(signal) => {
            tracing::info!(signal, "stopping the server");
            relay.cancel_held("Portcullis was stopped");
            to_server.close();
            let status = wait_with_grace(&mut child)?;
            drain(&ending);
            status
        }
        Ending::Failed(why) => {
            tracing::error!("{why}; stopping the proxy and its server");
            relay.cancel_held("Portcullis failed");
            to_server.close();
            to_client.close();
            wait_with_grace(&mut child)?;
            return Ok(FAILED);
        }
    };
    Ok(exit_code(status))
}

/// Waits (for at most [`DRAIN`]) until the server → client thread has relayed
/// everything the server wrote before it exited.
fn drain(ending: &mpsc::Receiver<Ending>) {
    let deadline = Instant::now() + DRAIN;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match ending.recv_timeout(left) {
            Ok(Ending::ServerClosed) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Where one direction's messages go: `onward`, and `back` to their sender.
struct Sides {
    onward: Arc<Outlet>,
    back: Arc<Outlet>,
}

impl Sides {
    /// Sends Portcullis' own `request` to the server. The server's thread
    /// sends it from a thread of its own: it must never wait for the
    /// server's input while the server may be waiting for it to read.
    fn ask_server(&self, direction: Direction, request: String) {
        match direction {
            Direction::ClientToServer => {
                self.onward.send(request.into_bytes());
            }
            Direction::ServerToClient => {
                let server = self.back.clone();
                let sent = std::thread::Builder::new()
                    .name("portcullis-survey".into())
                    .spawn(move || server.send(request.into_bytes()));
                if let Err(e) = sent {
                    tracing::warn!("cannot send the server Portcullis' own tools/list: {e}");
                }
            }
        }
    }
}

/// Reads frames from one side, judges them and sends the results on, until
/// end of stream or until the onward side is gone. A request held for
/// approval is sent on when its approval ends, without holding up the
/// traffic behind it (or any thread). Portcullis' own listing of the
/// server's tools is started when due, and its answers are taken out of
/// the server's output.
fn pump(
    relay: &Arc<Relay>,
    survey: &Survey,
    direction: Direction,
    input: impl BufRead,
    max: usize,
    sides: Sides,
) {
    let mut frames = FrameReader::new(input, max);
    loop {
        let frame = match frames.read_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(direction = direction.as_str(), "read failed: {e}");
                return;
            }
        };
        if direction == Direction::ServerToClient
            && let Some(answered) = survey.take(&frame)
        {
            surveyed(relay, survey, answered, &sides);
            continue;
        }
        if direction == Direction::ClientToServer
            && survey.first_under_way()
            && calls_a_tool(&frame)
        {
            survey.await_first(FIRST_LISTING_WAIT);
        }
        let delivery = relay.handle(direction, frame);
        for held in delivery.held {
            let (onward, back) = (sides.onward.clone(), sides.back.clone());
            relay.on_decision(held, move |settled| {
                if let Some(reply) = settled.reply {
                    back.send(reply);
                }
                settled.forward.is_none_or(|forward| onward.send(forward))
            });
        }
        if let Some(reply) = delivery.reply {
            sides.back.send(reply);
        }
        if let Some(forward) = delivery.forward
            && !sides.onward.send(forward)
        {
            tracing::warn!(direction = direction.as_str(), "the receiving side is gone");
            return;
        }
        if relay.survey_due(direction)
            && let Some(request) = survey.start()
        {
            sides.ask_server(direction, request);
        }
    }
}

/// Acts on the server's answer to Portcullis' own listing: the relay
/// learns a complete listing, which is audited (`tools-surveyed`), and
/// calls waiting for it go on; the next request goes to the server.
fn surveyed(relay: &Relay, survey: &Survey, answered: survey::Answered, sides: &Sides) {
    if let Some(listing) = &answered.listed {
        relay.learn_listing(listing);
        let record = AccessRecord::tools_surveyed("stdio", Some(&relay.agent()), listing);
        if let Err(e) = relay.current().audit.write(&record) {
            tracing::error!("cannot audit a listing of the server's tools: {e:#}");
        }
    }
    if let Some(why) = &answered.failed {
        tracing::warn!("listing the server's tools failed: {why}");
    }
    if answered.listed.is_some() || answered.failed.is_some() {
        survey.ended();
    }
    if let Some(request) = answered.send {
        sides.ask_server(Direction::ServerToClient, request);
    }
}

/// Whether `frame` is a client's tool call (or a batch, which may hold one).
fn calls_a_tool(frame: &Frame) -> bool {
    let Frame::Line(line) = frame else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(line) else {
        return false;
    };
    jsonrpc::is_batch(text)
        || Message::parse(text).is_ok_and(|m| m.method.as_deref() == Some("tools/call"))
}

/// Reports SIGTERM and SIGINT as an ending.
fn watch_signals(endings: mpsc::Sender<Ending>) -> Result<()> {
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).context("cannot watch signals")?;
    std::thread::Builder::new()
        .name("portcullis-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let _ = endings.send(Ending::Signal(signal));
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Waits for the server to exit, killing it if it has not within
/// [`EXIT_GRACE`]. Always reaps it.
fn wait_with_grace(child: &mut Child) -> Result<ExitStatus> {
    let deadline = Instant::now() + EXIT_GRACE;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::warn!("the server did not exit within {EXIT_GRACE:?}; killing it");
    let _ = child.kill();
    Ok(child.wait()?)
}

/// The shell convention: the exit code, or 128 + the signal that killed it.
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// `portcullis stdio`: one client on this process' stdin and stdout, one
/// server child, and the relay between them.
pub fn command(
    config_path: PathBuf,
    audit_file: Option<PathBuf>,
    server: Option<String>,
    command: Vec<String>,
) -> Result<i32> {
    let config = Config::load(&config_path)?;
    crate::audit::stdout_carries_mcp();
    let (name, server) = pick_server(&config, server, command)?;
    let (engine, shared) = crate::cli::engine_and_state(&config)?;
    let generation = Generation::load(&engine, &config_path, audit_file.as_deref(), 1, None)?;
    let agent = Agent {
        id: config.agent.id.clone(),
        attributes: config.agent.attributes.clone().into_iter().collect(),
    };
    tracing::info!(
        server = %name,
        agent = %agent.id,
        policies = generation.guard.policies().count(),
        "portcullis relaying"
    );
    let current = Arc::new(Current::shared(generation, shared));
    current.cancel_orphans();
    let relay = Arc::new(Relay::new(
        current.clone(),
        Session::new(name.clone(), agent),
    ));
    // A first call is judged by the pinned tools, listed or not.
    relay.learn_pinned();
    let reloader = Reloader::new(engine, current, config_path, audit_file, &name);
    Arc::new(reloader).start()?;
    let code = run(relay, &server, config.limits.max_message_bytes);
    crate::audit::flush(super::AUDIT_FLUSH);
    Status::withdraw(std::process::id());
    code
}

/// The server to run: the command after `--` if given, else the configured
/// server named by `--server`, or the only configured server.
fn pick_server(
    config: &Config,
    name: Option<String>,
    command: Vec<String>,
) -> Result<(String, ServerCommand)> {
    let only = || {
        (config.servers.len() == 1)
            .then(|| config.servers.keys().next().cloned())
            .flatten()
    };
    if let Some((program, args)) = command.split_first() {
        let name = name.or_else(only).unwrap_or_else(|| "stdio".into());
        let env = match config.servers.get(&name) {
            Some(server) => server.resolved_env(base(config))?,
            None => Default::default(),
        };
        let server = ServerCommand {
            program: program.clone(),
            args: args.to_vec(),
            env,
        };
        return Ok((name, server));
    }
    let Some(name) = name.or_else(only) else {
        bail!(
            "{}: name the server with --server, or give its command after --",
            config.path.display()
        );
    };
    let server = config.servers.get(&name).with_context(|| {
        format!(
            "{}: no server named '{name}' in [servers]",
            config.path.display()
        )
    })?;
    let Some(program) = &server.command else {
        bail!(
            "{}: servers.{name} is a remote server; stdio mode needs a command",
            config.path.display()
        );
    };
    Ok((
        name,
        ServerCommand {
            program: program.clone(),
            args: server.args.clone(),
            env: server.resolved_env(base(config))?,
        },
    ))
}

/// The directory config-relative paths start from.
fn base(config: &Config) -> &std::path::Path {
    config.path.parent().unwrap_or(std::path::Path::new("."))
}
