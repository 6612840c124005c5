//! The generic actix shell: owns one machine instance, feeds it events (messages, timers,
//! completed IO), and asks its `Driver` to perform the resulting actions.

use std::future::Future;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::registry::Registry;
use crate::fsm::timers::TimerTable;
use crate::fsm::{Instance, Label, Machine};

/// The IO half of one machine: performs each action the pure machine asks for.
pub trait Driver: Sized + Unpin + 'static {
    type M: Machine + Unpin;
    /// Requests from other actors that are not machine events (queries, hand-overs).
    type Input: Send + 'static;

    /// Performs `action`, caused by `event`. Follow-up events go through `io`.
    fn perform(
        &mut self,
        action: <Self::M as Machine>::Action,
        event: &<Self::M as Machine>::Event,
        machine: &Self::M,
        io: &mut Io<'_, Self>,
    );

    /// Handles one input; returns events to feed the machine, in order.
    fn input(
        &mut self,
        input: Self::Input,
        machine: &Self::M,
        io: &mut Io<'_, Self>,
    ) -> Vec<<Self::M as Machine>::Event>;

    /// Called once the machine reached a terminal state.
    fn closed(&mut self, _machine: &Self::M) {}
}

/// Lets a driver feed events back into its machine.
pub struct Io<'a, D: Driver> {
    ctx: &'a mut Context<Shell<D>>,
    now: Duration,
}

impl<D: Driver> Io<'_, D> {
    /// Runs `work` on the actor's event loop; its output, if any, is the machine's next event
    /// (none: a timer decides).
    pub fn spawn_opt<F>(&mut self, work: F)
    where
        F: Future<Output = Option<<D::M as Machine>::Event>> + 'static,
    {
        self.ctx.spawn(
            actix::fut::wrap_future::<_, Shell<D>>(work).map(|event, shell, ctx| {
                if let Some(event) = event {
                    shell.fire(event, ctx);
                }
            }),
        );
    }

    /// Runs blocking work (disk, CPU-heavy) on a worker thread, then feeds its event back.
    pub fn spawn_blocking<F>(&mut self, work: F)
    where
        F: FnOnce() -> <D::M as Machine>::Event + Send + 'static,
    {
        self.spawn_opt(async move {
            match tokio::task::spawn_blocking(work).await {
                Ok(event) => Some(event),
                Err(e) => {
                    tracing::error!(actor = D::M::NAME, error = %e, "blocking task failed");
                    None
                }
            }
        });
    }

    /// Runs `work`; `then` hands its output to the driver (to keep a resource it produced) and
    /// returns the machine's next event.
    pub fn spawn_then<F, T>(&mut self, work: F, then: T)
    where
        F: Future + 'static,
        T: FnOnce(&mut D, F::Output) -> <D::M as Machine>::Event + 'static,
    {
        self.ctx.spawn(
            actix::fut::wrap_future::<_, Shell<D>>(work).map(|out, shell, ctx| {
                let event = then(&mut shell.driver, out);
                shell.fire(event, ctx);
            }),
        );
    }

    /// Runs a background task owned by this actor (it ends when the actor stops).
    pub fn spawn_task<F>(&mut self, task: F) -> SpawnHandle
    where
        F: Future<Output = ()> + 'static,
    {
        self.ctx.spawn(actix::fut::wrap_future::<_, Shell<D>>(task))
    }

    pub fn cancel(&mut self, handle: SpawnHandle) {
        self.ctx.cancel_future(handle);
    }

    /// Queues an event for this machine behind what is already in its mailbox.
    pub fn send(&mut self, event: <D::M as Machine>::Event) {
        self.ctx.notify(Fire(event));
    }

    /// The shell's clock: time since the machine started (the clock its timers use).
    pub fn now(&self) -> Duration {
        self.now
    }

    pub fn address(&self) -> Addr<Shell<D>> {
        self.ctx.address()
    }
}

/// Feeds one event to the machine.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Fire<E: 'static>(pub E);

/// Hands an input to a shell's driver.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Input<I: 'static>(pub I);

/// Asks the machine to close; resolves once it reached a terminal state.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

pub struct Shell<D: Driver> {
    instance: Instance<D::M>,
    driver: D,
    timers: TimerTable<D::M>,
    started: Instant,
    next_timer: Option<SpawnHandle>,
    registry: Registry,
    closed_waiters: Vec<oneshot::Sender<()>>,
}

impl<D: Driver> Shell<D> {
    pub fn new(machine: D::M, id: impl Into<String>, driver: D, registry: Registry) -> Self {
        Shell {
            instance: Instance::new(machine, id),
            driver,
            timers: TimerTable::default(),
            started: Instant::now(),
            next_timer: None,
            registry,
            closed_waiters: Vec::new(),
        }
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn fire(&mut self, event: <D::M as Machine>::Event, ctx: &mut Context<Self>) {
        let Some(stepped) = self.instance.step(&event) else {
            return;
        };
        let now = self.now();
        self.timers
            .after_step(&self.instance.machine, &stepped, now);
        self.registry
            .set(D::M::NAME, self.instance.id(), stepped.to.name());
        for &action in stepped.actions {
            let mut io = Io { ctx, now };
            self.driver
                .perform(action, &event, &self.instance.machine, &mut io);
        }
        if self.instance.is_terminal() {
            self.timers.clear();
            self.driver.closed(&self.instance.machine);
            for waiter in self.closed_waiters.drain(..) {
                let _ = waiter.send(());
            }
            // A finished machine's actor goes away, and with it every IO future it spawned.
            ctx.stop();
            return;
        }
        self.schedule_timer(ctx);
    }

    /// Keeps one sleep for the earliest timer deadline.
    fn schedule_timer(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.next_timer.take() {
            ctx.cancel_future(handle);
        }
        if let Some(deadline) = self.timers.next_deadline() {
            let delay = deadline.saturating_sub(self.now());
            self.next_timer = Some(ctx.run_later(delay, |shell, ctx| {
                shell.next_timer = None;
                let now = shell.now();
                while let Some(timer) = shell.timers.pop_expired(&shell.instance.machine, now) {
                    shell.fire(<D::M as Machine>::timer_event(timer, now), ctx);
                }
                shell.schedule_timer(ctx);
            }));
        }
    }
}

impl<D: Driver> Actor for Shell<D> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Bound the mailbox: senders wait instead of growing memory without limit.
        ctx.set_mailbox_capacity(256);
        self.registry
            .set(D::M::NAME, self.instance.id(), self.instance.state().name());
        self.timers
            .enter(&self.instance.machine, self.instance.state(), self.now());
        self.schedule_timer(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.registry.remove(D::M::NAME, self.instance.id());
    }
}

impl<D: Driver> Handler<Fire<<D::M as Machine>::Event>> for Shell<D> {
    type Result = ();

    fn handle(&mut self, msg: Fire<<D::M as Machine>::Event>, ctx: &mut Context<Self>) {
        self.fire(msg.0, ctx);
    }
}

impl<D: Driver> Handler<Input<D::Input>> for Shell<D> {
    type Result = ();

    fn handle(&mut self, msg: Input<D::Input>, ctx: &mut Context<Self>) {
        let now = self.now();
        let events = {
            let mut io = Io { ctx, now };
            self.driver.input(msg.0, &self.instance.machine, &mut io)
        };
        for event in events {
            if self.instance.is_terminal() {
                break;
            }
            self.fire(event, ctx);
        }
    }
}

impl<D: Driver> Handler<Shutdown> for Shell<D> {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        if !self.instance.is_terminal() {
            self.fire(<D::M as Machine>::shutdown_event(), ctx);
        }
        if self.instance.is_terminal() {
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        self.closed_waiters.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}
