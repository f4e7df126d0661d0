//! A fault-injecting TCP relay that a test controls while it runs.
//!
//! [`Relay::start`] listens on `127.0.0.1:0` and forwards every connection it
//! accepts to one target address. The test switches it between three modes:
//!
//! * [`Relay::pass`]: bytes flow both ways.
//! * [`Relay::blackhole`]: a partition as a peer sees it. New connections are
//!   accepted and kept but not connected onwards (a real partition would
//!   stall the handshake too; no client can tell the difference from a peer
//!   that accepted and went silent); existing ones stall: the
//!   relay reads at most one buffer from each side and holds it, so senders
//!   soon block on full socket buffers and nothing arrives anywhere. No FIN,
//!   no RST, no error: only a timeout tells the client, which is exactly the
//!   case that exposes a stale leader (it cannot tell "slow" from "cut off").
//!   Held bytes are delivered in order after `pass()`, as TCP would
//!   retransmit them once a real partition heals.
//! * [`Relay::reset`]: existing connections are closed (both sides, with an
//!   RST once the relay drops them) and new ones are reset on accept: a node
//!   that crashed or a port nobody listens on.
//!
//! [`Relay::counters`] says how many connections were accepted, refused and
//! are open, and how many bytes went each way (bytes passed on, not held
//! ones).
//!
//! For issue 12's partition test, each node's route to each peer points at
//! its own relay, so one link or one node's links can be cut:
//!
//! ```no_run
//! # fn demo(peer: std::net::SocketAddr) -> std::io::Result<()> {
//! use kv_testkit::Relay;
//! let link = Relay::start(peer)?; // give link.addr() to the other node
//! link.blackhole(); // partitioned: requests over the link get no answer
//! link.pass(); // healed: held bytes go on
//! let counters = link.close(); // every socket closed, every thread joined
//! assert_eq!((counters.open, counters.threads), (0, 0));
//! # Ok(())
//! # }
//! ```
//!
//! **Why a relay rather than network namespaces with veth pairs and
//! iptables:** it needs no root and no kernel features, so it runs the same
//! on a laptop, in a container and in CI; it is per link (point one peer at
//! a relay and only that link is cut); it can black-hole (`DROP`-like
//! stalls), not only refuse; and it cleans up with the test, leaving no rule
//! or interface behind when a test panics.
//!
//! **Bounded, and cleaned up.** Plain threads and blocking `std::net`
//! sockets: one thread accepts, two pump each connection (one per
//! direction), each with one fixed buffer; at most [`MAX_CONNECTIONS`] are
//! open (more are reset on accept); connecting onwards gives up after
//! [`CONNECT_TIMEOUT`]. Mode changes wake every waiting thread through a
//! condition variable, and reset or close shut the sockets down, which wakes
//! every blocked read and write: nothing polls or sleeps. Dropping the relay (or [`Relay::close`]) closes every
//! socket and joins every thread before it returns.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Connections open at once through one relay; more are reset on accept.
pub const MAX_CONNECTIONS: usize = 256;
/// How long the relay tries to connect to its target before resetting the
/// client's connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read (and, when black-holed, held) per direction per connection.
const BUFFER: usize = 16 * 1024;
/// Pump threads only copy bytes; a small stack is plenty.
const STACK: usize = 128 * 1024;

/// What the relay does with traffic; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Blackhole,
    Reset,
}

/// A snapshot of the relay's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections accepted and kept (forwarded, or held while black-holed).
    pub connections: u64,
    /// Connections reset on accept (in `reset` mode, or over the bound).
    pub refused: u64,
    /// Connections open now.
    pub open: u64,
    /// Relay threads running now (the accepting one included).
    pub threads: u64,
    /// Bytes passed on from clients to the target.
    pub bytes_to_target: u64,
    /// Bytes passed on from the target to clients.
    pub bytes_from_target: u64,
}

/// A TCP relay on `127.0.0.1:0` in front of one target; see the module docs.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    target: SocketAddr,
    state: Mutex<State>,
    /// Signalled on every mode change and on close.
    changed: Condvar,
    connections: AtomicU64,
    refused: AtomicU64,
    threads: AtomicU64,
    bytes_to_target: AtomicU64,
    bytes_from_target: AtomicU64,
}

struct State {
    mode: Mode,
    /// Added to every chunk in either direction before it is passed on
    /// (a slow link); zero by default.
    delay: Duration,
    closing: bool,
    next_id: u64,
    /// A clone of every socket of every open connection, so that a mode
    /// change or close can wake threads blocked on them.
    open: HashMap<u64, Conn>,
    /// Threads that may still run; finished ones are pruned as new start.
    threads: Vec<JoinHandle<()>>,
}

struct Conn {
    client: TcpStream,
    upstream: Option<TcpStream>,
    /// Pumps still running; the last one out removes the connection.
    pumps: u8,
}

impl Conn {
    fn sockets(&self) -> impl Iterator<Item = &TcpStream> {
        std::iter::once(&self.client).chain(self.upstream.as_ref())
    }
}

impl Relay {
    /// Starts a relay to `target`, in [`Mode::Pass`].
    pub fn start(target: SocketAddr) -> io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            state: Mutex::new(State {
                mode: Mode::Pass,
                delay: Duration::ZERO,
                closing: false,
                next_id: 0,
                open: HashMap::new(),
                threads: Vec::new(),
            }),
            changed: Condvar::new(),
            connections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            threads: AtomicU64::new(0),
            bytes_to_target: AtomicU64::new(0),
            bytes_from_target: AtomicU64::new(0),
        });
        let accepting = shared.clone();
        shared.threads.fetch_add(1, Ordering::SeqCst);
        let acceptor = thread::Builder::new()
            .name("relay-accept".into())
            .stack_size(STACK)
            .spawn(move || {
                accept_loop(&accepting, listener);
                accepting.threads.fetch_sub(1, Ordering::SeqCst);
            });
        let acceptor = match acceptor {
            Ok(handle) => handle,
            Err(error) => {
                shared.threads.fetch_sub(1, Ordering::SeqCst);
                return Err(error);
            }
        };
        Ok(Relay {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the relay forwards to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.shared.lock().mode
    }

    /// Forward both ways; held bytes and connections go on.
    pub fn pass(&self) {
        self.set_mode(Mode::Pass);
    }

    /// Accept and keep connections but forward nothing; stall existing ones.
    pub fn blackhole(&self) {
        self.set_mode(Mode::Blackhole);
    }

    /// Holds every chunk `delay` before passing it on, in each direction
    /// (so a request and its answer take `2 * delay` more): a slow link.
    /// Open connections get it from their next chunk; order is kept.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().delay = delay;
        self.shared.changed.notify_all();
    }

    /// Close existing connections and reset new ones.
    pub fn reset(&self) {
        self.set_mode(Mode::Reset);
    }

    fn set_mode(&self, mode: Mode) {
        let mut state = self.shared.lock();
        state.mode = mode;
        if mode == Mode::Reset {
            for conn in state.open.values() {
                conn.sockets().for_each(abort);
            }
        }
        self.shared.changed.notify_all();
    }

    /// The counters now.
    pub fn counters(&self) -> Counters {
        self.shared.counters()
    }

    /// Waits until the counters satisfy `ready`, at most `bound`; returns
    /// the last counters seen either way (the caller asserts on them).
    pub fn wait_for(&self, bound: Duration, ready: impl Fn(&Counters) -> bool) -> Counters {
        let deadline = Instant::now() + bound;
        let mut state = self.shared.lock();
        loop {
            let counters = self.shared.counters_locked(&state);
            let left = deadline.saturating_duration_since(Instant::now());
            if ready(&counters) || left.is_zero() {
                return counters;
            }
            state = match self.shared.changed.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poison) => poison.into_inner().0,
            };
        }
    }

    /// Closes every connection, joins every thread and returns the final
    /// counters (`open` and `threads` are then 0: nothing leaked).
    pub fn close(mut self) -> Counters {
        self.shut_down();
        self.shared.counters()
    }

    fn shut_down(&mut self) {
        {
            let mut state = self.shared.lock();
            state.closing = true;
            for conn in state.open.values() {
                conn.sockets().for_each(abort);
            }
            self.shared.changed.notify_all();
        }
        if let Some(acceptor) = self.acceptor.take() {
            // The acceptor is blocked in accept(): a connection wakes it, and
            // it sees `closing` (so does any failed accept). Only a process
            // out of descriptors could fail to connect, and then the join
            // waits for the next client of this port.
            let _ = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT);
            let _ = acceptor.join();
        }
        // No thread starts once `closing` is set (checked under the lock
        // that also records the handle), so this drains them all.
        loop {
            let threads = std::mem::take(&mut self.shared.lock().threads);
            if threads.is_empty() {
                break;
            }
            for thread in threads {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking pump cannot leave the state half-changed: keep going.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn counters(&self) -> Counters {
        self.counters_locked(&self.lock())
    }

    fn counters_locked(&self, state: &State) -> Counters {
        let open = state.open.len() as u64;
        Counters {
            connections: self.connections.load(Ordering::SeqCst),
            refused: self.refused.load(Ordering::SeqCst),
            open,
            threads: self.threads.load(Ordering::SeqCst),
            bytes_to_target: self.bytes_to_target.load(Ordering::SeqCst),
            bytes_from_target: self.bytes_from_target.load(Ordering::SeqCst),
        }
    }

    /// Adds `n` to `counter` and wakes [`Relay::wait_for`]; taking the lock
    /// after the update means a waiter cannot miss it.
    fn count(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::SeqCst);
        let _state = self.lock();
        self.changed.notify_all();
    }

    /// Waits while black-holed; true if traffic may flow, false if the
    /// connection must be dropped (reset or closing).
    fn wait_to_pass(&self) -> bool {
        let mut state = self.lock();
        loop {
            if state.closing {
                return false;
            }
            match state.mode {
                Mode::Pass => return true,
                Mode::Reset => return false,
                Mode::Blackhole => {
                    state = self
                        .changed
                        .wait(state)
                        .unwrap_or_else(|poison| poison.into_inner());
                }
            }
        }
    }

    /// Starts `work` on a pump thread unless the relay is closing; the
    /// handle is recorded under the same lock, so close joins it.
    fn spawn(self: &Arc<Self>, state: &mut State, work: impl FnOnce() + Send + 'static) -> bool {
        if state.closing {
            return false;
        }
        state.threads.retain(|t| !t.is_finished());
        let shared = self.clone();
        self.threads.fetch_add(1, Ordering::SeqCst);
        let spawned = thread::Builder::new()
            .name("relay-pump".into())
            .stack_size(STACK)
            .spawn(move || {
                work();
                shared.threads.fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(handle) => {
                state.threads.push(handle);
                true
            }
            Err(_) => {
                self.threads.fetch_sub(1, Ordering::SeqCst);
                false
            }
        }
    }

    /// One pump of connection `id` finished; the last one closes it.
    fn pump_done(&self, id: u64) {
        let mut state = self.lock();
        let last = match state.open.get_mut(&id) {
            Some(conn) => {
                conn.pumps = conn.pumps.saturating_sub(1);
                conn.pumps == 0
            }
            None => false,
        };
        if last {
            state.open.remove(&id);
            self.changed.notify_all();
        }
    }
}

/// Closes a socket hard: an RST when its last descriptor is dropped, and
/// every thread blocked on it wakes now.
fn abort(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
    let _ = socket.shutdown(Shutdown::Both);
}

/// Resets a connection nobody else holds: an RST, without a FIN first.
fn refuse(socket: TcpStream) {
    let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    for incoming in listener.incoming() {
        let mut state = shared.lock();
        if state.closing {
            return;
        }
        // A failed accept (the client gave up, descriptors ran out) costs
        // that client only.
        let Ok(client) = incoming else { continue };
        let _ = client.set_nodelay(true);
        if state.mode == Mode::Reset || state.open.len() >= MAX_CONNECTIONS {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            shared.changed.notify_all();
            refuse(client);
            continue;
        }
        let Ok(registered) = client.try_clone() else {
            abort(&client);
            continue;
        };
        let id = state.next_id;
        state.next_id += 1;
        state.open.insert(
            id,
            Conn {
                client: registered,
                upstream: None,
                pumps: 1,
            },
        );
        let forwarding = shared.clone();
        if shared.spawn(&mut state, move || forward(&forwarding, id, client)) {
            shared.connections.fetch_add(1, Ordering::SeqCst);
            shared.changed.notify_all();
        } else if let Some(conn) = state.open.remove(&id) {
            conn.sockets().for_each(abort);
        }
    }
}

/// Runs one connection: waits for the link to pass, connects onwards,
/// starts the target-to-client pump and runs the client-to-target one.
fn forward(shared: &Arc<Shared>, id: u64, client: TcpStream) {
    let upstream = if shared.wait_to_pass() {
        TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT).ok()
    } else {
        None
    };
    let started = upstream.and_then(|upstream| {
        let _ = upstream.set_nodelay(true);
        let (registered, from_target, to_client) = (
            upstream.try_clone().ok()?,
            upstream.try_clone().ok()?,
            client.try_clone().ok()?,
        );
        let mut state = shared.lock();
        // Reset or close may have come while connecting.
        if state.closing || state.mode == Mode::Reset {
            return None;
        }
        let conn = state.open.get_mut(&id)?;
        conn.upstream = Some(registered);
        conn.pumps = 2;
        let back = shared.clone();
        let spawned = shared.spawn(&mut state, move || {
            pump(&back, from_target, to_client, &back.bytes_from_target);
            back.pump_done(id);
        });
        if !spawned {
            if let Some(conn) = state.open.get_mut(&id) {
                conn.pumps = 1;
            }
            return None;
        }
        Some(upstream)
    });
    match started {
        Some(upstream) => pump(shared, client, upstream, &shared.bytes_to_target),
        None => abort(&client),
    }
    shared.pump_done(id);
}

/// Copies `from` to `to`, holding each chunk while black-holed and, with a
/// delay set, until `delay` after it was read (a writer thread keeps the
/// order, so the reader goes on reading meanwhile: a delay, not a
/// throttle). An end of stream is passed on as one (a half-close); a
/// reset, a close or an error aborts both sockets.
fn pump(shared: &Shared, mut from: TcpStream, to: TcpStream, delivered: &AtomicU64) {
    let mut buffer = vec![0u8; BUFFER];
    let (queue, delayed) = std::sync::mpsc::channel::<(Instant, Option<Vec<u8>>)>();
    let Ok(mut writer_to) = to.try_clone() else {
        abort(&from);
        abort(&to);
        return;
    };
    let Ok(writer_from) = from.try_clone() else {
        abort(&from);
        abort(&to);
        return;
    };
    let writer = thread::Builder::new()
        .name("relay-delay".into())
        .stack_size(STACK)
        .spawn(move || {
            for (due, chunk) in delayed {
                let wait = due.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    thread::sleep(wait);
                }
                match chunk {
                    Some(chunk) => {
                        if writer_to.write_all(&chunk).is_err() {
                            abort(&writer_from);
                            abort(&writer_to);
                            return;
                        }
                    }
                    None => {
                        let _ = writer_to.shutdown(Shutdown::Write);
                        return;
                    }
                }
            }
        });
    let Ok(writer) = writer else {
        abort(&from);
        abort(&to);
        return;
    };
    loop {
        let read = from.read(&mut buffer);
        // A read woken by `abort` looks like an end of stream: ask the mode.
        let n = match read {
            Ok(n) if shared.wait_to_pass() => n,
            _ => break,
        };
        let due = Instant::now() + shared.lock().delay;
        if n == 0 {
            let _ = queue.send((due, None));
            drop(queue);
            let _ = writer.join();
            return;
        }
        // Counted before the write, so that a client that has seen bytes
        // also sees them counted.
        shared.count(delivered, n as u64);
        // `read` returned at most the buffer's length.
        let chunk = buffer.get(..n).unwrap_or_default().to_vec();
        if queue.send((due, Some(chunk))).is_err() {
            break;
        }
    }
    abort(&from);
    abort(&to);
    drop(queue);
    let _ = writer.join();
}
