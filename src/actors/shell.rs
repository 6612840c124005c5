//! The generic actix shell: owns one machine instance, feeds it events (messages, timers,
//! completed IO) with a [`Ctx`] built from the one process clock, and hands every output to its
//! `Driver` to perform. Drivers hold no rule of their own: what to do is in the outputs.

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::registry::Registry;
use crate::fsm::{Ctx, Instance, Label, Machine};

/// The process's monotonic clock origin: every shell measures time from it, so times from
/// different actors compare.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Where code outside a machine's step gets the time: [`ctx_now`] in the node, a fake in tests.
/// Drivers take their time from [`Io::ctx`] or from a `Clock` they were given, never a clock of
/// their own (the layering test checks).
pub type Clock = fn() -> Ctx;

/// The context of a step taken now: monotonic and wall-clock time, and a fresh random number.
pub fn ctx_now() -> Ctx {
    Ctx {
        now: origin().elapsed(),
        wall: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
        random: rand::random(),
    }
}

/// The IO half of one machine: performs each output the pure machine produces.
pub trait Driver: Sized + Unpin + 'static {
    type M: Machine + Unpin;
    /// News from other actors that the driver turns into machine events (hand-overs of
    /// resources, reports), or answers itself.
    type Input: Send + 'static;
    /// A question another actor (or the control socket) asks, answered at once.
    type Query: Send + 'static;
    type Answer: Send + 'static;

    /// Performs one output of a step. Follow-up events go through `io`.
    fn perform(
        &mut self,
        output: <Self::M as Machine>::Output,
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

    /// Answers a query from what the driver and the machine know.
    fn query(
        &mut self,
        query: Self::Query,
        machine: &Self::M,
        io: &mut Io<'_, Self>,
    ) -> Self::Answer;

    /// Called once the machine reached a terminal state.
    fn closed(&mut self, _machine: &Self::M) {}
}

/// Lets a driver run IO and feed events back into its machine.
pub struct Io<'a, D: Driver> {
    ctx: &'a mut Context<Shell<D>>,
    /// The time of the step (or input) being handled: drivers read no clock of their own.
    step: Ctx,
}

impl<D: Driver> Io<'_, D> {
    /// The context of the step being performed: its monotonic and wall-clock time.
    pub fn ctx(&self) -> Ctx {
        self.step
    }

    /// Wall-clock seconds since the Unix epoch, for what is persisted or sent.
    pub fn unix_secs(&self) -> u64 {
        self.step.wall.as_secs()
    }

    /// Runs `work` on the actor's event loop; its output, if any, is the machine's next event
    /// (none: a timer decides).
    pub fn spawn_opt<F>(&mut self, work: F)
    where
        F: Future<Output = Option<<D::M as Machine>::Event>> + 'static,
    {
        self.ctx.spawn(
            actix::fut::wrap_future::<_, Shell<D>>(work).map(|event, shell, ctx| {
                if let Some(event) = event {
                    shell.deliver(event, ctx);
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
                shell.deliver(event, ctx);
            }),
        );
    }

    /// Like [`Io::spawn_then`], for work whose outcome may not concern the machine.
    pub fn spawn_then_opt<F, T>(&mut self, work: F, then: T)
    where
        F: Future + 'static,
        T: FnOnce(&mut D, F::Output) -> Option<<D::M as Machine>::Event> + 'static,
    {
        self.ctx.spawn(
            actix::fut::wrap_future::<_, Shell<D>>(work).map(|out, shell, ctx| {
                if let Some(event) = then(&mut shell.driver, out) {
                    shell.deliver(event, ctx);
                }
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
        self.ctx.notify(Deliver(event));
    }

    pub fn address(&self) -> Addr<Shell<D>> {
        self.ctx.address()
    }
}

/// Delivers one event to the machine.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver<E: 'static>(pub E);

/// Hands an input to a shell's driver.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Input<I: 'static>(pub I);

/// Asks a shell's driver a question; the answer is the message's result.
pub struct Query<Q: 'static, A: 'static>(pub Q, std::marker::PhantomData<fn() -> A>);

impl<Q: 'static, A: 'static> Query<Q, A> {
    pub fn new(query: Q) -> Self {
        Query(query, std::marker::PhantomData)
    }
}

impl<Q: 'static, A: 'static> Message for Query<Q, A> {
    type Result = A;
}

/// Asks the machine to close; resolves once it reached a terminal state.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// Mailbox bound of every shell: `send().await` waits when it is full.
pub const MAILBOX: usize = 256;

pub struct Shell<D: Driver> {
    instance: Instance<D::M>,
    driver: D,
    next_timer: Option<SpawnHandle>,
    registry: Registry,
    closed_waiters: Vec<oneshot::Sender<()>>,
}

impl<D: Driver> Shell<D> {
    pub fn new(machine: D::M, id: impl Into<String>, driver: D, registry: Registry) -> Self {
        Shell {
            instance: Instance::new(machine, id),
            driver,
            next_timer: None,
            registry,
            closed_waiters: Vec::new(),
        }
    }

    fn deliver(&mut self, event: <D::M as Machine>::Event, ctx: &mut Context<Self>) {
        if self.instance.is_terminal() {
            return;
        }
        let step = ctx_now();
        let Some(stepped) = self.instance.step(&event, &step) else {
            return;
        };
        if stepped.state_changed() {
            self.registry
                .set(D::M::NAME, self.instance.id(), stepped.to.name());
        }
        for output in stepped.outputs {
            let mut io = Io { ctx, step };
            self.driver.perform(output, &self.instance.machine, &mut io);
        }
        if self.instance.is_terminal() {
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
        if let Some(deadline) = self.instance.next_deadline() {
            let delay = deadline.saturating_sub(origin().elapsed());
            // Far-off deadlines (a week) are re-checked rather than slept on in one go.
            let delay = delay.min(Duration::from_secs(7 * 24 * 3600));
            self.next_timer = Some(ctx.run_later(delay, |shell, ctx| {
                shell.next_timer = None;
                let now = origin().elapsed();
                while let Some(timer) = shell.instance.due_timer(now) {
                    shell.deliver(<D::M as Machine>::timer_event(timer), ctx);
                    if shell.instance.is_terminal() {
                        return;
                    }
                }
                shell.schedule_timer(ctx);
            }));
        }
    }
}

impl<D: Driver> Actor for Shell<D> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Bounds `send().await`; senders of best-effort notices use `try_send` and count drops.
        ctx.set_mailbox_capacity(MAILBOX);
        self.registry
            .set(D::M::NAME, self.instance.id(), self.instance.state().name());
        self.instance.start(origin().elapsed());
        self.schedule_timer(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.registry.remove(D::M::NAME, self.instance.id());
    }
}

impl<D: Driver> Handler<Deliver<<D::M as Machine>::Event>> for Shell<D> {
    type Result = ();

    fn handle(&mut self, msg: Deliver<<D::M as Machine>::Event>, ctx: &mut Context<Self>) {
        self.deliver(msg.0, ctx);
    }
}

impl<D: Driver> Handler<Input<D::Input>> for Shell<D> {
    type Result = ();

    fn handle(&mut self, msg: Input<D::Input>, ctx: &mut Context<Self>) {
        let events = {
            let mut io = Io {
                ctx,
                step: ctx_now(),
            };
            self.driver.input(msg.0, &self.instance.machine, &mut io)
        };
        for event in events {
            if self.instance.is_terminal() {
                break;
            }
            self.deliver(event, ctx);
        }
    }
}

impl<D: Driver> Handler<Query<D::Query, D::Answer>> for Shell<D> {
    type Result = MessageResult<Query<D::Query, D::Answer>>;

    fn handle(&mut self, msg: Query<D::Query, D::Answer>, ctx: &mut Context<Self>) -> Self::Result {
        let mut io = Io {
            ctx,
            step: ctx_now(),
        };
        MessageResult(self.driver.query(msg.0, &self.instance.machine, &mut io))
    }
}

impl<D: Driver> Handler<Shutdown> for Shell<D> {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        if !self.instance.is_terminal() {
            self.deliver(<D::M as Machine>::shutdown_event(), ctx);
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
