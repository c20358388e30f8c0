//! The control handler without KVM: VMs in state `created` (which touch nothing), frames
//! fed to it directly, and real loopback connections through the test listener.

use std::io::Write;

use super::*;
use crate::migration::channel::raw::RawClient;
use crate::migration::PeerKey;
use crate::remote::client::{MigrateOptions, RemoteError, RemoteHost};
use crate::remote::test_listener;
use crate::{GuestSpec, VmConfig};

const KEY: &[u8] = b"remote-control-test-key-0123456789";
const T: Duration = Duration::from_secs(10);

fn registry_with(names: &[&str]) -> Arc<Registry> {
    let registry = Arc::new(Registry::new());
    for name in names {
        let mut config = VmConfig::new(
            *name,
            GuestSpec::Builtin {
                cmdline: "hello".into(),
            },
        );
        config.memory = 16 << 20;
        registry.create(config).unwrap();
    }
    registry
}

fn answer(server: &ControlServer, payload: &[u8]) -> ResponseFrame {
    decode(&server.handle_frame(payload)).expect("the answer decodes")
}

fn ask(server: &ControlServer, request: Request) -> Result<Reply, Failure> {
    let frame = RequestFrame { id: 9, request };
    let response = answer(server, &encode(&frame).unwrap());
    assert_eq!(response.id, 9);
    response.result
}

fn failure(result: Result<Reply, Failure>) -> Failure {
    match result {
        Ok(reply) => panic!("expected a failure, got {reply:?}"),
        Err(f) => f,
    }
}

#[test]
fn malformed_requests_get_failure_responses() {
    let server = ControlServer::new(registry_with(&[]), ControlHooks::default());
    for garbage in [
        &b""[..],
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        b"\x01",
    ] {
        let response = answer(&server, garbage);
        let f = failure(response.result);
        assert_eq!(f.kind, FailureKind::BadRequest, "{garbage:?}: {f:?}");
        assert!(f.message.contains("malformed"), "{}", f.message);
    }
    // A request id, then a request variant this host does not know (a newer client).
    let mut unknown = postcard::to_stdvec(&42u64).unwrap();
    unknown.extend_from_slice(&postcard::to_stdvec(&200u32).unwrap());
    let response = answer(&server, &unknown);
    assert_eq!(
        response.id, 42,
        "the id is answered even when the request is not"
    );
    let f = failure(response.result);
    assert_eq!(f.kind, FailureKind::BadRequest);
    assert_eq!(
        f.message,
        "unknown request #200; the client may be newer than this host"
    );
    // Trailing bytes after a valid request.
    let mut trailing = encode(&RequestFrame {
        id: 3,
        request: Request::ListVms,
    })
    .unwrap();
    trailing.extend_from_slice(b"xx");
    let f = failure(answer(&server, &trailing).result);
    assert!(f.message.contains("trailing"), "{}", f.message);
    // Invalid UTF-8 in a name.
    let mut bad_text = postcard::to_stdvec(&4u64).unwrap();
    bad_text.extend_from_slice(&postcard::to_stdvec(&2u32).unwrap()); // FindVm
    bad_text.extend_from_slice(&[2, 0xff, 0xfe]);
    assert_eq!(
        failure(answer(&server, &bad_text).result).kind,
        FailureKind::BadRequest
    );
}

#[test]
fn unknown_and_stale_vms_are_named() {
    let registry = registry_with(&["alpha", "beta"]);
    let server = ControlServer::new(registry.clone(), ControlHooks::default());
    let f = failure(ask(
        &server,
        Request::FindVm {
            name: "gamma".into(),
        },
    ));
    assert_eq!(f.kind, FailureKind::NoSuchVm);
    assert_eq!(
        f.message,
        "there is no vm named 'gamma'; its VMs are: alpha, beta"
    );
    let Ok(Reply::Vm(alpha)) = ask(
        &server,
        Request::FindVm {
            name: "alpha".into(),
        },
    ) else {
        panic!("alpha is found");
    };
    assert_eq!(alpha.state, "created");
    assert_eq!(alpha.memory_size, 16 << 20);
    // A destroyed VM whose name was taken again is not the same VM.
    registry.destroy(VmId(alpha.id));
    registry_create(&registry, "alpha");
    let f = failure(ask(&server, Request::Pause { vm: alpha.vm_ref() }));
    assert_eq!(f.kind, FailureKind::NoSuchVm);
    assert_eq!(f.message, "vm 'alpha' no longer exists");
    // An id with another VM's name.
    let wrong = VmRef {
        id: alpha.id + 1,
        name: "alpha".into(),
    };
    assert_eq!(
        failure(ask(&server, Request::Stop { vm: wrong })).kind,
        FailureKind::NoSuchVm
    );
    // The runtime's own errors come back as they are.
    let Ok(Reply::Vm(beta)) = ask(
        &server,
        Request::FindVm {
            name: "beta".into(),
        },
    ) else {
        panic!("beta is found");
    };
    let f = failure(ask(&server, Request::Pause { vm: beta.vm_ref() }));
    assert_eq!(f.kind, FailureKind::Failed);
    assert_eq!(f.message, "cannot pause vm 'beta': it is created");
    let f = failure(ask(
        &server,
        Request::Wait {
            vm: beta.vm_ref(),
            timeout_ms: 10,
            overall_timeout_ms: 10,
        },
    ));
    assert_eq!(f.message, "cannot wait for vm 'beta': it was never started");
}

fn registry_create(registry: &Registry, name: &str) {
    let mut config = VmConfig::new(
        name,
        GuestSpec::Builtin {
            cmdline: "hello".into(),
        },
    );
    config.memory = 16 << 20;
    registry.create(config).unwrap();
}

#[test]
fn oversized_fields_are_refused_before_anything_runs() {
    let registry = registry_with(&["vm"]);
    let server = ControlServer::new(registry.clone(), ControlHooks::default());
    let vm = VmRef {
        id: registry.find("vm").unwrap().id().0,
        name: "vm".into(),
    };
    let too_big = [
        Request::Send {
            vm: vm.clone(),
            bytes: vec![b'x'; MAX_INPUT + 1],
        },
        Request::ReadMemory {
            vm: vm.clone(),
            gpa: 0,
            len: MAX_MEMORY_CHUNK + 1,
        },
        Request::WriteMemory {
            vm: vm.clone(),
            gpa: 0,
            bytes: vec![0; MAX_MEMORY_CHUNK as usize + 1],
        },
        Request::WaitForConsole {
            vm: vm.clone(),
            pattern: "x".repeat(MAX_PATTERN + 1),
            after: 0,
            timeout_ms: 10,
            overall_timeout_ms: 10,
        },
        Request::Wait {
            vm: vm.clone(),
            timeout_ms: millis(MAX_WAIT_SLICE) + 1,
            overall_timeout_ms: 0,
        },
        Request::FindVm {
            name: "n".repeat(MAX_TEXT + 1),
        },
        Request::SetMemoryTarget {
            vm: vm.clone(),
            target: 1 << 30,
            reason: "r".repeat(MAX_TEXT + 1),
        },
    ];
    for request in too_big {
        let name = request.name();
        let f = failure(ask(&server, request));
        assert_eq!(f.kind, FailureKind::BadRequest, "{name}: {f:?}");
        assert!(
            f.message.contains("more than") || f.message.contains("longer than"),
            "{name}: {}",
            f.message
        );
    }
    // Nothing changed: the target is still the startup size.
    assert_eq!(registry.find("vm").unwrap().memory_target(), 16 << 20);
}

#[test]
fn a_panicking_hook_becomes_a_failure_and_the_host_goes_on() {
    let registry = registry_with(&["vm"]);
    let hooks = ControlHooks {
        policies: None,
        migrate: Some(Arc::new(|_, _, _| panic!("migration bug"))),
    };
    let server = ControlServer::new(registry.clone(), hooks);
    let vm = VmRef {
        id: registry.find("vm").unwrap().id().0,
        name: "vm".into(),
    };
    let f = failure(ask(
        &server,
        Request::Migrate {
            vm,
            addr: "127.0.0.1:1".into(),
            key_file: None,
            max_downtime_ms: 300,
            timeout_ms: 1000,
            auto_converge: false,
            progress: false,
        },
    ));
    assert_eq!(f.kind, FailureKind::Failed);
    assert!(
        f.message.contains("panicked: migration bug"),
        "{}",
        f.message
    );
    assert!(matches!(ask(&server, Request::ListVms), Ok(Reply::Vms(v)) if v.len() == 1));
}

fn serve(registry: Arc<Registry>, hooks: ControlHooks) -> String {
    test_listener::spawn(PeerKey::from_bytes(KEY), control_handler(registry, hooks)).unwrap()
}

fn connect(addr: &str) -> RemoteHost {
    RemoteHost::connect(addr, PeerKey::from_bytes(KEY), T).unwrap()
}

#[test]
fn a_client_drives_created_vms_and_hooks_over_a_real_connection() {
    let registry = registry_with(&["one", "two"]);
    let addr = serve(registry.clone(), ControlHooks::default());
    let mut host = connect(&addr);
    assert!(!host.name().is_empty());
    let info = host.host_info().unwrap();
    assert_eq!(info.name, host.name());
    assert!(info.cpus >= 1);
    let vms = host.list_vms().unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["one", "two"]);
    let one = host.find_vm("one").unwrap().vm_ref();
    let err = host.find_vm("three").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("host {addr}: there is no vm named 'three'; its VMs are: one, two")
    );
    // Fixed memory: every target is clamped to the one size.
    assert_eq!(
        host.set_memory_target(&one, 1 << 30, "test").unwrap(),
        (16 << 20, true)
    );
    let memory = host.memory(&one).unwrap();
    assert_eq!(
        (memory.min, memory.max, memory.target),
        (16 << 20, 16 << 20, 16 << 20)
    );
    assert_eq!(memory.stats, None);
    assert_eq!(host.console(&one).unwrap(), "");
    let err = host.send(&one, b"hi").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("host {addr}: cannot send input to vm 'one': it is created")
    );
    let err = host.read_memory(&one, 0, 16).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot read the memory of vm 'one'"),
        "{err}"
    );
    // Client-side bounds: refused before anything is sent.
    let err = host.send(&one, &vec![0; MAX_INPUT + 1]).unwrap_err();
    assert!(matches!(err, RemoteError::TooLarge { .. }), "{err}");
    // No policy provider: no policies. No migration hook: a clear refusal.
    assert_eq!(host.policies().unwrap(), serde_json::json!([]));
    let err = host
        .migrate(&one, "127.0.0.1:1", &MigrateOptions::default(), None)
        .unwrap_err();
    assert_eq!(err.failure_kind(), Some(FailureKind::Unavailable));
    assert_eq!(
        err.to_string(),
        format!("host {addr}: cannot migrate vm 'one': migration is not available on this host")
    );
    // A wait on a VM that never started fails at once, whatever the timeout.
    let err = host
        .wait(&one, Duration::from_secs(3600), &|| false)
        .unwrap_err();
    assert!(err.to_string().contains("never started"), "{err}");
    // A cancelled wait ends between slices.
    let err = host
        .wait_for_console(&one, "x", 0, Duration::MAX, &|| true)
        .unwrap_err();
    assert!(matches!(err, RemoteError::Cancelled { .. }), "{err}");
}

#[test]
fn hooks_answer_policies_and_migrations() {
    let registry = registry_with(&["web"]);
    let hooks = ControlHooks {
        policies: Some(Arc::new(
            || serde_json::json!([{ "name": "default", "running": true }]),
        )),
        migrate: Some(Arc::new(|vm, params, _| {
            if params.addr == "refuse" {
                return Err("the destination refused".into());
            }
            Ok(serde_json::json!({
                "vm": vm.name(),
                "addr": params.addr,
                "key_file": params.key_file,
                "max_downtime_ms": params.max_downtime.as_millis() as u64,
                "auto_converge": params.auto_converge,
            }))
        })),
    };
    let addr = serve(registry, hooks);
    let mut host = connect(&addr);
    assert_eq!(
        host.policies().unwrap(),
        serde_json::json!([{ "name": "default", "running": true }])
    );
    let web = host.find_vm("web").unwrap().vm_ref();
    let options = MigrateOptions {
        key_file: Some("/etc/luvisor/key".into()),
        max_downtime: Duration::from_millis(250),
        timeout: Duration::from_secs(5),
        auto_converge: true,
    };
    assert_eq!(
        host.migrate(&web, "10.0.0.2:7001", &options, None).unwrap(),
        serde_json::json!({
            "vm": "web", "addr": "10.0.0.2:7001",
            "key_file": "/etc/luvisor/key", "max_downtime_ms": 250,
            "auto_converge": true
        })
    );
    let err = host.migrate(&web, "refuse", &options, None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("host {addr}: the destination refused")
    );
}

#[test]
fn a_wrong_key_is_refused() {
    let addr = serve(registry_with(&[]), ControlHooks::default());
    let err = RemoteHost::connect(&addr, PeerKey::from_bytes(b"another-key-entirely-0123"), T)
        .unwrap_err();
    let RemoteError::Connect { source, .. } = &err else {
        panic!("{err}");
    };
    assert!(matches!(source, ChannelError::AuthFailed { .. }), "{err}");
}

#[test]
fn wrong_frames_get_answers_and_an_oversized_one_ends_only_its_connection() {
    let addr = serve(registry_with(&["vm"]), ControlHooks::default());
    let mut raw = RawClient::connect(&addr, &PeerKey::from_bytes(KEY));
    raw.send(KIND_CONTROL_HELLO, b"");
    let (kind, welcome) = raw.recv().expect("a welcome");
    assert_eq!(kind, KIND_CONTROL_HELLO);
    assert!(matches!(decode::<Welcome>(&welcome), Ok(Ok(w)) if w.version == CONTROL_VERSION));
    // A frame of another kind gets a failure; garbage gets a failure; the connection
    // stays usable.
    raw.send(99, b"?");
    let (kind, answer) = raw.recv().expect("an answer");
    assert_eq!(kind, KIND_CONTROL_RESPONSE);
    let f = failure(decode::<ResponseFrame>(&answer).unwrap().result);
    assert!(
        f.message.contains("unexpected frame kind 99"),
        "{}",
        f.message
    );
    raw.send(KIND_CONTROL_REQUEST, b"\xff\x00garbage");
    let (_, answer) = raw.recv().expect("an answer");
    assert_eq!(
        failure(decode::<ResponseFrame>(&answer).unwrap().result).kind,
        FailureKind::BadRequest
    );
    let list = encode(&RequestFrame {
        id: 5,
        request: Request::ListVms,
    })
    .unwrap();
    raw.send(KIND_CONTROL_REQUEST, &list);
    let (_, answer) = raw.recv().expect("an answer");
    assert!(
        matches!(decode::<ResponseFrame>(&answer).unwrap().result, Ok(Reply::Vms(v)) if v.len() == 1)
    );
    // A header that announces 4 GiB: the host drops this connection, reading nothing.
    raw.stream.write_all(&u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(raw.recv(), None, "the host closed the connection");
    // Other connections are served as before.
    assert_eq!(connect(&addr).list_vms().unwrap().len(), 1);
}

#[test]
fn a_lost_connection_is_reopened_by_the_next_call() {
    let addr = serve(registry_with(&["vm"]), ControlHooks::default());
    let mut host = connect(&addr);
    assert_eq!(host.list_vms().unwrap().len(), 1);
    // Break the stream under the client: the next call fails, the one after reconnects.
    host.break_connection();
    let err = host.list_vms().unwrap_err();
    assert!(matches!(err, RemoteError::Channel { .. }), "{err}");
    assert!(
        err.to_string().contains("the next call reconnects"),
        "{err}"
    );
    assert_eq!(host.list_vms().unwrap().len(), 1);
}

#[test]
fn newest_console_text_keeps_whole_characters() {
    assert_eq!(newest("abc".into(), 5), "abc");
    assert_eq!(newest("abcdef".into(), 3), "def");
    assert_eq!(newest("aéb".into(), 2), "b");
}

#[test]
fn connections_beyond_the_limit_are_refused_in_the_welcome() {
    let addr = serve(registry_with(&[]), ControlHooks::default());
    let open: Vec<RemoteHost> = (0..MAX_CONNECTIONS).map(|_| connect(&addr)).collect();
    let err = RemoteHost::connect(&addr, PeerKey::from_bytes(KEY), T).unwrap_err();
    assert!(matches!(err, RemoteError::Refused { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!(
            "serves at most {MAX_CONNECTIONS} control connections"
        )),
        "{err}"
    );
    drop(open);
}

fn progress(iteration: u32, final_pass: bool) -> MigrationProgress {
    MigrationProgress {
        iteration,
        remaining_bytes: 4096 * u64::from(100 - iteration),
        sent_bytes: 1 << 20,
        mbps: 800.0 + f64::from(iteration),
        throttle: 0.2,
        final_pass,
    }
}

#[test]
fn a_migration_streams_each_pass_when_the_client_keeps_up() {
    // The hook's migration waits, before each next pass, until the client saw the last
    // report: then none is replaced by a newer one, and every one arrives, in order,
    // before the response.
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<u32>();
    let seen_rx = Mutex::new(seen_rx);
    let hooks = ControlHooks {
        policies: None,
        migrate: Some(Arc::new(move |_, _, on_progress| {
            for iteration in 0..4 {
                on_progress(&progress(iteration, iteration == 3));
                let seen = seen_rx.lock().unwrap().recv_timeout(T);
                assert_eq!(seen, Ok(iteration), "the client saw pass {iteration}");
            }
            Ok(serde_json::json!({ "iterations": 4 }))
        })),
    };
    let addr = serve(registry_with(&["web"]), hooks);
    let mut host = connect(&addr);
    let web = host.find_vm("web").unwrap().vm_ref();
    let mut reports = Vec::new();
    let report = host
        .migrate(
            &web,
            "10.0.0.2:7001",
            &MigrateOptions::default(),
            Some(&mut |p: &MigrationProgress| {
                reports.push(p.clone());
                seen_tx.send(p.iteration).unwrap();
            }),
        )
        .unwrap();
    assert_eq!(report, serde_json::json!({ "iterations": 4 }));
    let expected: Vec<MigrationProgress> = (0..4).map(|i| progress(i, i == 3)).collect();
    assert_eq!(reports, expected);
    // The connection goes on: the next call is answered.
    assert_eq!(host.list_vms().unwrap().len(), 1);
}

#[test]
fn a_fast_migration_sends_fewer_reports() {
    // 1000 passes in a burst: the host keeps only the newest report while it waits
    // out its interval (and sends the final pass's before the response: see the relay
    // test below). The client skips reports that a newer frame already follows, so it
    // may show none of them; whatever it shows comes in order, the final one last.
    let hooks = ControlHooks {
        policies: None,
        migrate: Some(Arc::new(|_, _, on_progress| {
            for iteration in 0..1000 {
                on_progress(&progress(iteration % 100, iteration == 999));
            }
            Ok(serde_json::json!({}))
        })),
    };
    let addr = serve(registry_with(&["web"]), hooks);
    let mut host = connect(&addr);
    let web = host.find_vm("web").unwrap().vm_ref();
    let mut reports = Vec::new();
    host.migrate(
        &web,
        "10.0.0.2:7001",
        &MigrateOptions::default(),
        Some(&mut |p: &MigrationProgress| reports.push(p.clone())),
    )
    .unwrap();
    assert!(reports.len() < 1000, "{}", reports.len());
    let finals = reports.iter().filter(|p| p.final_pass).count();
    assert!(finals <= 1, "{finals}");
    if finals == 1 {
        assert_eq!(reports.last(), Some(&progress(99, true)));
    }
    // Without on_progress the host sends none (the client would refuse them).
    host.migrate(&web, "10.0.0.2:7001", &MigrateOptions::default(), None)
        .unwrap();
}

#[test]
fn the_relay_keeps_the_newest_report_and_sends_what_waits_when_finished() {
    let relay = ProgressRelay::default();
    relay.push(&progress(0, false));
    assert_eq!(relay.next(Instant::now()), Some(progress(0, false)));
    relay.push(&progress(1, false));
    relay.push(&progress(2, true));
    // Finished: what waits goes at once, whatever the interval says, then nothing.
    relay.finish();
    let far = Instant::now() + Duration::from_secs(3600);
    assert_eq!(relay.next(far), Some(progress(2, true)));
    assert_eq!(relay.next(far), None);
}

#[test]
fn a_panic_after_the_migration_still_ends_the_progress_sender() {
    // The sender waits in `next` for the relay to finish; if what runs beside it
    // panics, the relay must still finish, or the scope would wait for the sender
    // forever. Here the panic reaches the caller, after the sender sent what waited.
    let sent = Mutex::new(Vec::new());
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        with_relay(
            |relay| {
                while let Some(p) = relay.next(Instant::now()) {
                    sent.lock().unwrap().push(p);
                }
            },
            |relay| {
                relay.push(&progress(7, true));
                panic!("encoding the response failed");
            },
        )
    }));
    assert!(outcome.is_err());
    assert_eq!(*sent.lock().unwrap(), vec![progress(7, true)]);
}

#[test]
fn the_relay_returns_the_work_and_the_senders_results() {
    let (answer, sent) = with_relay(
        |relay| std::iter::from_fn(|| relay.next(Instant::now())).count(),
        |relay| {
            relay.push(&progress(1, true));
            "response"
        },
    );
    assert_eq!((answer, sent), ("response", Some(1)));
}

#[test]
fn progress_the_client_did_not_ask_for_is_a_protocol_error() {
    // A host that sends progress for another request before its answer.
    let handler: Arc<dyn Fn(SecureChannel) + Send + Sync> =
        Arc::new(|mut channel: SecureChannel| {
            let welcome: Welcome = Ok(WelcomeInfo {
                version: CONTROL_VERSION,
                host: "liar".into(),
            });
            channel
                .send(KIND_CONTROL_HELLO, &encode(&welcome).unwrap())
                .unwrap();
            while let Ok((_, payload)) = channel.recv() {
                let frame: RequestFrame = decode(&payload).unwrap();
                let stray = ProgressFrame {
                    id: frame.id + 100,
                    progress: progress(0, false),
                };
                let _ = channel.send(KIND_CONTROL_PROGRESS, &encode(&stray).unwrap());
                let response = ResponseFrame {
                    id: frame.id,
                    result: Ok(Reply::Json("{}".into())),
                };
                let _ = channel.send(KIND_CONTROL_RESPONSE, &encode(&response).unwrap());
            }
        });
    let addr = test_listener::spawn(PeerKey::from_bytes(KEY), handler).unwrap();
    let mut host = connect(&addr);
    let web = VmRef {
        id: 1,
        name: "web".into(),
    };
    let err = host
        .migrate(&web, "x:1", &MigrateOptions::default(), None)
        .unwrap_err();
    assert!(matches!(err, RemoteError::Protocol { .. }), "{err}");
    assert!(err.to_string().contains("did not ask for it"), "{err}");
    let err = host
        .migrate(&web, "x:1", &MigrateOptions::default(), Some(&mut |_| {}))
        .unwrap_err();
    assert!(err.to_string().contains("came during request"), "{err}");
}

#[test]
fn a_client_behind_on_progress_reports_only_the_newest_and_none_after_the_response() {
    // A host that writes three progress frames in one go, as they pile up in the
    // socket while a slow on_progress runs. For the first request it then waits until
    // on_progress ran before it answers; for the second the response comes in the
    // same write.
    let (called_tx, called_rx) = std::sync::mpsc::channel::<()>();
    let called_rx = Mutex::new(called_rx);
    let handler: Arc<dyn Fn(SecureChannel) + Send + Sync> =
        Arc::new(move |mut channel: SecureChannel| {
            let welcome: Welcome = Ok(WelcomeInfo {
                version: CONTROL_VERSION,
                host: "buffered".into(),
            });
            channel
                .send(KIND_CONTROL_HELLO, &encode(&welcome).unwrap())
                .unwrap();
            let mut request = 0;
            while let Ok((_, payload)) = channel.recv() {
                let frame: RequestFrame = decode(&payload).unwrap();
                let mut burst = Vec::new();
                for iteration in 0..3 {
                    let report = ProgressFrame {
                        id: frame.id,
                        progress: progress(iteration, iteration == 2),
                    };
                    burst.extend(
                        channel.frame_bytes(KIND_CONTROL_PROGRESS, &encode(&report).unwrap()),
                    );
                }
                let response = ResponseFrame {
                    id: frame.id,
                    result: Ok(Reply::Json("{}".into())),
                };
                let response =
                    channel.frame_bytes(KIND_CONTROL_RESPONSE, &encode(&response).unwrap());
                if request == 0 {
                    channel.send_raw(&burst);
                    called_rx.lock().unwrap().recv_timeout(T).unwrap();
                    channel.send_raw(&response);
                } else {
                    burst.extend(response);
                    channel.send_raw(&burst);
                }
                request += 1;
            }
        });
    let addr = test_listener::spawn(PeerKey::from_bytes(KEY), handler).unwrap();
    let mut host = connect(&addr);
    let web = VmRef {
        id: 1,
        name: "web".into(),
    };
    let mut reports = Vec::new();
    host.migrate(
        &web,
        "x:1",
        &MigrateOptions::default(),
        Some(&mut |p: &MigrationProgress| {
            reports.push(p.clone());
            called_tx.send(()).unwrap();
        }),
    )
    .unwrap();
    assert_eq!(reports, vec![progress(2, true)]);
    // The response is there with the reports: they are all stale.
    host.migrate(
        &web,
        "x:1",
        &MigrateOptions::default(),
        Some(&mut |p: &MigrationProgress| reports.push(p.clone())),
    )
    .unwrap();
    assert_eq!(reports, vec![progress(2, true)]);
}

#[test]
fn a_key_file_that_cannot_be_read_fails_like_any_migration_that_did_not_begin() {
    let registry = registry_with(&["web"]);
    let hooks = ControlHooks {
        policies: None,
        migrate: Some(migrate_hook(None)),
    };
    let addr = serve(registry.clone(), hooks);
    let mut host = connect(&addr);
    let web = host.find_vm("web").unwrap().vm_ref();
    let options = MigrateOptions {
        key_file: Some("/nonexistent/luvisor-key".into()),
        ..MigrateOptions::default()
    };
    let err = host
        .migrate(&web, "127.0.0.1:1", &options, None)
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "host {addr}: cannot migrate vm 'web' to 127.0.0.1:1 (it is created here): \
             cannot read key file /nonexistent/luvisor-key: "
        )),
        "{text}"
    );
    // No key file and none served with: said the same way.
    let err = host
        .migrate(&web, "127.0.0.1:1", &MigrateOptions::default(), None)
        .unwrap_err();
    assert!(
        err.to_string().ends_with(
            "cannot migrate vm 'web' to 127.0.0.1:1 (it is created here): no key_file was \
             given and this host serves without a key"
        ),
        "{err}"
    );
    assert_eq!(
        registry.find("web").unwrap().state(),
        crate::VmState::Created
    );
}
