//! The server's threads: the receive loop (admits only datagrams that
//! verify under a live family's key and are fresh) and the workers that
//! read pages from the family's source and send them.

use super::*;
/// Receives datagrams until stopped; dropping `tx` at the end stops the
/// workers once the queue drains.
pub(super) fn receive_loop(shared: &ServerState, tx: SyncSender<Job>) {
    // One extra byte so an over-long datagram shows as a bad length.
    let mut rbuf = [0u8; MAX_DATAGRAM + 1];
    let mut sbuf = [0u8; MAX_DATAGRAM];
    while !shared.stop.load(Ordering::Acquire) {
        let (n, from) = match shared.socket.recv_from(&mut rbuf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                // E.g. ECONNREFUSED from an ICMP error for an earlier reply.
                tracing::debug!(error = %e, "page server recv error");
                continue;
            }
        };
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let Some((peer, family, body)) = admit(shared, &rbuf[..n], from) else {
            continue;
        };
        let c = &shared.counters;
        let Some(family) = family else {
            bump(&c.family_gone);
            shared.send_error(&mut sbuf, &peer, (ErrorCode::UnknownFamily, 0, 0));
            continue;
        };
        match body {
            Body::InfoRequest => {
                bump(&c.info_requests);
                let body = Body::InfoReply {
                    pages: family.source.pages(),
                    max_window: shared.limits.max_pages_per_request,
                };
                shared.send(&mut sbuf, &peer, body);
            }
            Body::PageRequest { first_page, count } => {
                bump(&c.requests);
                if let Err(refused) = accept(shared, &tx, family, &peer, first_page, count) {
                    shared.send_error(&mut sbuf, &peer, refused);
                }
            }
            // `admit` passes requests only.
            Body::PageReply { .. } | Body::ErrorReply { .. } | Body::InfoReply { .. } => {
                bump(&c.malformed);
            }
        }
    }
}

/// Checks that a datagram proves itself (module docs): decodes, is a
/// request, of a family the server knows (live, or removed: `None`), with
/// a valid MAC and a fresh sequence number. Counts and drops all else.
fn admit<'a>(
    shared: &ServerState,
    dgram: &'a [u8],
    from: SocketAddr,
) -> Option<(Peer, Option<Arc<ServedFamily>>, Body<'a>)> {
    let c = &shared.counters;
    let frame = match Frame::decode(dgram) {
        Ok(f) if f.body.kind().is_request() => f,
        Ok(_) => {
            // Replies are not for us: a foreign or looped-back datagram.
            bump(&c.malformed);
            return None;
        }
        Err(WireError::UnsupportedVersion(v)) if v < VERSION => {
            bump(&c.dropped_unproven);
            tracing::debug!(%from, version = v, "dropping unauthenticated old-version datagram");
            return None;
        }
        Err(e) => {
            bump(&c.malformed);
            tracing::debug!(%from, error = %e, "dropping malformed datagram");
            return None;
        }
    };
    let (auth, family) = match shared.lookup(frame.family) {
        Lookup::Live(f) => (f.auth.clone(), Some(f)),
        Lookup::Gone(a) => (a, None),
        Lookup::Unknown => {
            bump(&c.dropped_unknown_family);
            return None;
        }
    };
    if let Err(e) = wire::verify(dgram, &auth.key) {
        bump(&c.dropped_bad_mac);
        tracing::debug!(%from, error = %e, "dropping forged datagram");
        return None;
    }
    match auth.replay.accept(frame.client, frame.seq) {
        Ok(()) => {}
        Err(Refusal::Replayed) => {
            bump(&c.dropped_replay);
            return None;
        }
        Err(Refusal::TooManyClients) => {
            bump(&c.dropped_too_many_clients);
            return None;
        }
    }
    let peer = Peer {
        to: from,
        auth,
        client: frame.client,
        seq: frame.seq,
    };
    Some((peer, family, frame.body))
}

/// Validates a page request and queues it for a worker; `Err` is the error
/// reply to send.
fn accept(
    shared: &ServerState,
    tx: &SyncSender<Job>,
    family: Arc<ServedFamily>,
    peer: &Peer,
    first: u64,
    count: u32,
) -> Result<(), Refused> {
    let c = &shared.counters;
    if count == 0 {
        bump(&c.malformed);
        return Ok(());
    }
    bump(&family.requests);
    let limit = shared.limits.max_pages_per_request;
    if count > limit {
        bump(&c.too_large);
        return Err((ErrorCode::TooLarge, first, limit.into()));
    }
    let pages = family.source.pages();
    if first
        .checked_add(count.into())
        .is_none_or(|end| end > pages)
    {
        bump(&c.out_of_range);
        return Err((ErrorCode::OutOfRange, first.max(pages), pages));
    }
    let job = Job {
        family,
        peer: peer.clone(),
        first,
        count,
    };
    match tx.try_send(job) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => {
            bump(&c.overloaded);
            Err((ErrorCode::Overloaded, first, 0))
        }
        Err(TrySendError::Disconnected(_)) => {
            bump(&c.internal_errors);
            Err((ErrorCode::Internal, first, 0))
        }
    }
}

pub(super) fn worker_loop(shared: &ServerState, rx: &Mutex<Receiver<Job>>) {
    let mut sbuf = [0u8; MAX_DATAGRAM];
    let mut page = [0u8; PAGE_SIZE];
    loop {
        let job = {
            let rx = lock(rx);
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        serve(shared, &job, &mut sbuf, &mut page);
    }
}

fn serve(
    shared: &ServerState,
    job: &Job,
    sbuf: &mut [u8; MAX_DATAGRAM],
    page: &mut [u8; PAGE_SIZE],
) {
    let c = &shared.counters;
    for i in job.first..job.first + u64::from(job.count) {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = job.family.source.read_page(i, page) {
            let (code, detail) = match e {
                SourceError::OutOfRange { pages, .. } => {
                    bump(&c.out_of_range);
                    (ErrorCode::OutOfRange, pages)
                }
                SourceError::UnknownFamily(_) => {
                    bump(&c.family_gone);
                    (ErrorCode::UnknownFamily, 0)
                }
                e => {
                    bump(&c.internal_errors);
                    let family = job.family.auth.key.id();
                    tracing::debug!(family, page = i, error = %e, "page source failed");
                    (ErrorCode::Internal, 0)
                }
            };
            shared.send_error(sbuf, &job.peer, (code, i, detail));
            return;
        }
        let body = Body::PageReply {
            page: i,
            data: page,
        };
        if shared.send(sbuf, &job.peer, body) {
            bump(&c.pages_sent);
            bump(&job.family.pages_sent);
        }
    }
}
