//! The seccomp filters: smtpd's allow-list and the other daemons'
//! deny-list.
//!
//! smtpd's list was collected by running the end-to-end tests under
//! `strace -f` and reading tokio's, rustls' and the allocator's code
//! paths; each entry says who needs it. Arguments are filtered where a
//! call could otherwise reach beyond smtpd's job: `socket` only for
//! `AF_UNIX` (cleanup, anvil), `mmap` never executable and no `mprotect`,
//! no `clone` at all (smtpd is one thread: it can neither fork nor start a
//! thread), no `sendmsg` and no `recvmsg` but behind postscreen (which
//! passes it each client's socket), `ioctl` and
//! `fcntl` only for the descriptor flags std and tokio set, `tgkill` only
//! to this process.

use super::{SandboxError, Seccomp};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// The system calls smtpd may make without conditions. Those marked
/// "seen" are what smtpd made across the end-to-end, conformance, interop
/// (STARTTLS with swaks, openssl, curl, msmtp, smtplib), PROXY, abuse and
/// lifetime tests under `strace -f`; the others are on paths those tests
/// rarely reach, each named.
const SMTPD_PLAIN: &[(i64, &str)] = &[
    // Seen: the client socket, the cleanup and anvil sockets, the log.
    (libc::SYS_write, "write"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_close, "close"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_getpeername, "getpeername"),
    (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_setsockopt, "setsockopt"),
    // Seen: the child loop's and tokio's epoll sets.
    (libc::SYS_epoll_create1, "epoll_create1"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    // Seen: locks, randomness (rustls, hash keys), the allocator.
    (libc::SYS_futex, "futex"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_munmap, "munmap"),
    // Seen: the SIGTERM handler's return, and the way out.
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_exit_group, "exit_group"),
    // Reading a descriptor smtpd already holds (tokio may use read(2)).
    (libc::SYS_read, "read"),
    // Large or growing buffers (big BDAT chunks, TLS records) leave brk.
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_madvise, "madvise"),
    // The clock without the vDSO (some virtual clock sources), and the
    // child loop's pause after an accept error.
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    // A sleep or wait interrupted by SIGTERM resumes through this.
    (libc::SYS_restart_syscall, "restart_syscall"),
    // abort() after a panic in a release build: block signals, raise
    // SIGABRT on itself (tgkill is limited to this process below).
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_gettid, "gettid"),
    // Seen on x86_64; other architectures only have the p-variant.
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_epoll_wait, "epoll_wait"),
    #[cfg(not(target_arch = "x86_64"))]
    (libc::SYS_epoll_pwait, "epoll_pwait"),
];

/// System calls no mortal daemon makes: debugging other processes,
/// mounts and namespaces, kernel modules and keys, clocks and swap.
/// The [`Seccomp::DenyList`] profile, which every daemon but smtpd states
/// (an allow-list would have to follow every delivery and, in pipe, the
/// operator's command, which inherits the filter); smtpd's allow-list
/// excludes them anyway.
const DENIED: &[(i64, &str)] = &[
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_pidfd_getfd, "pidfd_getfd"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_fspick, "fspick"),
    (libc::SYS_move_mount, "move_mount"),
    (libc::SYS_open_tree, "open_tree"),
    (libc::SYS_mount_setattr, "mount_setattr"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_syslog, "syslog"),
    (libc::SYS_settimeofday, "settimeofday"),
    (libc::SYS_clock_settime, "clock_settime"),
    (libc::SYS_clock_adjtime, "clock_adjtime"),
    (libc::SYS_adjtimex, "adjtimex"),
    (libc::SYS_quotactl, "quotactl"),
    (libc::SYS_fanotify_init, "fanotify_init"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_iopl, "iopl"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_ioperm, "ioperm"),
];

/// What a daemon that may not run a program is also denied.
const NO_EXEC: &[(i64, &str)] = &[(libc::SYS_execve, "execve"), (libc::SYS_execveat, "execveat")];

/// What a daemon that may not create a process is also denied. Threads
/// are made with `clone` and `CLONE_THREAD`, which stays allowed (see
/// [`NO_FORK`]).
const NO_PROCESS: &[(i64, &str)] = &[
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_fork, "fork"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_vfork, "vfork"),
];

/// `clone` without `CLONE_THREAD` makes a process, not a thread: what
/// fork(3), posix_spawn(3) and std's `Command` use.
const NO_FORK: u64 = libc::CLONE_THREAD as u64;

/// The namespace flags `clone` may never carry.
const CLONE_NAMESPACES: [u64; 7] = [
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

fn cond(arg: u8, len: Len, op: Op, value: u64) -> Result<Cond, SandboxError> {
    Ok(Cond::new(arg, len, op, value)?)
}

fn rule(conditions: Vec<Cond>) -> Result<SeccompRule, SandboxError> {
    Ok(SeccompRule::new(conditions)?)
}

/// smtpd's allow-list, conditional entries included.
pub fn smtpd_rules() -> Result<Rules, SandboxError> {
    let mut rules: Rules = SMTPD_PLAIN.iter().map(|&(nr, _)| (nr, Vec::new())).collect();
    // Memory for the allocator, never executable: no shellcode pages.
    let not_exec = cond(2, Len::Dword, Op::MaskedEq(libc::PROT_EXEC as u64), 0)?;
    rules.insert(libc::SYS_mmap, vec![rule(vec![not_exec])?]);
    // The cleanup and anvil connections; never TCP, UDP, raw or netlink.
    rules.insert(libc::SYS_socket, vec![rule(vec![cond(0, Len::Dword, Op::Eq, libc::AF_UNIX as u64)?])?]);
    // std and tokio set O_NONBLOCK and FD_CLOEXEC this way; nothing else.
    let request = |value: u64| -> Result<SeccompRule, SandboxError> { rule(vec![cond(1, Len::Qword, Op::Eq, value)?]) };
    rules.insert(libc::SYS_ioctl, vec![request(libc::FIONBIO)?, request(libc::FIOCLEX)?]);
    let fcntl = [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL, libc::F_DUPFD_CLOEXEC]
        .into_iter()
        .map(|cmd| rule(vec![cond(1, Len::Dword, Op::Eq, cmd as u64)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_fcntl, fcntl);
    // Only this process: std's abort raises SIGABRT on itself this way.
    let me = u64::from(std::process::id());
    rules.insert(libc::SYS_tgkill, vec![rule(vec![cond(0, Len::Dword, Op::Eq, me)?])?]);
    Ok(rules)
}

/// What smtpd additionally needs for `[smtpd] reverse_lookup`, found with
/// `strace -f` while lookups ran: UDP and TCP sockets to the nameservers
/// (`socket` for `AF_INET`/`AF_INET6` only, never raw or netlink; the
/// resolver binds its UDP socket to a random source port). connect,
/// sendto, recvfrom, getsockname and setsockopt are on the plain list.
const SMTPD_DNS_PLAIN: &[(i64, &str)] = &[(libc::SYS_bind, "bind")];

/// smtpd's allow-list with [`SMTPD_DNS_PLAIN`] and the inet sockets added,
/// for `[smtpd] reverse_lookup = true`.
pub fn smtpd_dns_rules() -> Result<Rules, SandboxError> {
    smtpd_rules_for(true, false, false)
}

/// `SOCK_STREAM` in `socket`'s type argument, whatever flags
/// (`SOCK_CLOEXEC`, `SOCK_NONBLOCK`) ride along with it.
const SOCKET_TYPE_MASK: u64 = 0xf;

/// smtpd's allow-list for its configuration: the plain list, plus what
/// reverse lookups need (`dns`), plus TCP client sockets for `inet:`
/// milters and policy servers (`tcp_client`: `AF_INET`/`AF_INET6` of type
/// `SOCK_STREAM` only; connect and the socket options are on the plain
/// list), plus `recvmsg` for a child of postscreen's hand-off socket
/// (`receive_sockets`: it takes each client's socket that way).
pub fn smtpd_rules_for(dns: bool, tcp_client: bool, receive_sockets: bool) -> Result<Rules, SandboxError> {
    let mut rules = smtpd_rules()?;
    if receive_sockets {
        rules.insert(libc::SYS_recvmsg, Vec::new());
    }
    if dns {
        rules.extend(SMTPD_DNS_PLAIN.iter().map(|&(nr, _)| (nr, Vec::new())));
        let domains = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
            .into_iter()
            .map(|domain| rule(vec![cond(0, Len::Dword, Op::Eq, domain as u64)?]))
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_socket, domains);
    } else if tcp_client {
        let stream = |domain: i32| -> Result<SeccompRule, SandboxError> {
            rule(vec![
                cond(0, Len::Dword, Op::Eq, domain as u64)?,
                cond(1, Len::Dword, Op::MaskedEq(SOCKET_TYPE_MASK), libc::SOCK_STREAM as u64)?,
            ])
        };
        let unix = rule(vec![cond(0, Len::Dword, Op::Eq, libc::AF_UNIX as u64)?])?;
        rules.insert(libc::SYS_socket, vec![unix, stream(libc::AF_INET)?, stream(libc::AF_INET6)?]);
    }
    Ok(rules)
}

fn deny_rules(may_exec: bool, may_fork: bool) -> Result<Rules, SandboxError> {
    let exec: &[(i64, &str)] = if may_exec { &[] } else { NO_EXEC };
    let fork: &[(i64, &str)] = if may_fork { &[] } else { NO_PROCESS };
    let mut rules: Rules = DENIED.iter().chain(exec).chain(fork).map(|&(nr, _)| (nr, Vec::new())).collect();
    let mut clone = CLONE_NAMESPACES
        .iter()
        .map(|&flag| rule(vec![cond(0, Len::Qword, Op::MaskedEq(flag), flag)?]))
        .collect::<Result<Vec<_>, _>>()?;
    if !may_fork {
        clone.push(rule(vec![cond(0, Len::Qword, Op::MaskedEq(NO_FORK), 0)?])?);
    }
    rules.insert(libc::SYS_clone, clone);
    Ok(rules)
}

fn arch() -> Result<TargetArch, SandboxError> {
    Ok(TargetArch::try_from(std::env::consts::ARCH).map_err(seccompiler::Error::Backend)?)
}

fn compile(rules: Rules, mismatch: SeccompAction, matched: SeccompAction) -> Result<BpfProgram, SandboxError> {
    Ok(SeccompFilter::new(rules, mismatch, matched, arch()?)?.try_into()?)
}

/// The filters of a profile, compiled ([`compile_profile`],
/// [`compile_zygote`]) and not yet installed ([`install`]).
#[derive(Debug)]
pub struct Compiled {
    no_clone3: BpfProgram,
    main: BpfProgram,
    /// System calls the profile's list names.
    count: usize,
}

/// Compiles the filters of `profile`.
pub fn compile_profile(profile: Seccomp) -> Result<Compiled, SandboxError> {
    let (main, count) = match profile {
        Seccomp::AllowList { dns, tcp_client, receive_sockets } => {
            let rules = smtpd_rules_for(dns, tcp_client, receive_sockets)?;
            let count = rules.len();
            (compile(rules, SeccompAction::KillProcess, SeccompAction::Allow)?, count)
        }
        Seccomp::DenyList { may_exec, may_fork } => {
            let rules = deny_rules(may_exec, may_fork)?;
            let count = rules.len();
            (compile(rules, SeccompAction::Allow, SeccompAction::KillProcess)?, count)
        }
    };
    Ok(Compiled { no_clone3: no_clone3()?, main, count })
}

/// clone3 passes its flags in memory, where seccomp cannot look: every
/// daemon uses clone instead, whose flags the filters check.
fn no_clone3() -> Result<BpfProgram, SandboxError> {
    let rules: Rules = [(libc::SYS_clone3, Vec::new())].into();
    compile(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32))
}

/// What a zygote's allow-list adds to smtpd's, for itself and for what
/// each child does between its fork and its [`tail`]: the zygote's own
/// requests and its fork (`clone`, conditional, below), the child's move
/// of its status socket to fd 1, the event loop and SIGTERM handler a
/// child makes for itself, and the install of the tail. The tail takes
/// every one of them away again.
const ZYGOTE_EXTRA: &[(i64, &str)] = &[
    (libc::SYS_recvmsg, "recvmsg"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_dup2, "dup2"),
    (libc::SYS_dup3, "dup3"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_socketpair, "socketpair"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_seccomp, "seccomp"),
];

/// The one `clone` a zygote makes ([`crate::sys::fork_sibling`]).
const ZYGOTE_CLONE: u64 = (libc::CLONE_PARENT | libc::SIGCHLD) as u64;

/// A zygote's filters: `profile` as its children will hold it, loosened
/// by what the zygote and a child before its [`tail`] must still do. The
/// zygote installs them in itself with the rest of the sandbox, and its
/// children inherit them.
pub fn compile_zygote(profile: Seccomp) -> Result<Compiled, SandboxError> {
    let (count, mismatch, matched) = match profile {
        Seccomp::AllowList { dns, tcp_client, receive_sockets } => {
            (smtpd_rules_for(dns, tcp_client, receive_sockets)?.len(), SeccompAction::KillProcess, SeccompAction::Allow)
        }
        Seccomp::DenyList { may_exec, may_fork } => {
            (deny_rules(may_exec, may_fork)?.len(), SeccompAction::Allow, SeccompAction::KillProcess)
        }
    };
    Ok(Compiled { no_clone3: no_clone3()?, main: compile(zygote_rules(profile)?, mismatch, matched)?, count })
}

/// The list of a zygote's main filter ([`compile_zygote`]).
fn zygote_rules(profile: Seccomp) -> Result<Rules, SandboxError> {
    match profile {
        Seccomp::AllowList { dns, tcp_client, receive_sockets } => {
            let mut rules = smtpd_rules_for(dns, tcp_client, receive_sockets)?;
            for &(nr, _) in ZYGOTE_EXTRA {
                rules.entry(nr).or_default();
            }
            rules.insert(libc::SYS_clone, vec![rule(vec![cond(0, Len::Qword, Op::Eq, ZYGOTE_CLONE)?])?]);
            // Each child's own pid is known only after the fork: the tail
            // narrows this back to the child itself.
            rules.insert(libc::SYS_tgkill, Vec::new());
            Ok(rules)
        }
        Seccomp::DenyList { may_exec, .. } => deny_rules(may_exec, true),
    }
}

/// What a forked child denies itself on top of its zygote's filters, so
/// that it holds exactly `profile` (filters stack; the kernel takes the
/// strictest answer): everything [`compile_zygote`] added. `None` when
/// the zygote added nothing (a deny-list that lets a process be created).
/// Compiled in the child, which alone knows its pid; a handful of
/// instructions, where the whole list is hundreds.
pub fn tail(profile: Seccomp) -> Result<Option<BpfProgram>, SandboxError> {
    match tail_rules(profile, std::process::id())? {
        Some(rules) => compile(rules, SeccompAction::Allow, SeccompAction::KillProcess).map(Some),
        None => Ok(None),
    }
}

/// The list of [`tail`] for the child `me`; a match kills.
fn tail_rules(profile: Seccomp, me: u32) -> Result<Option<Rules>, SandboxError> {
    Ok(Some(match profile {
        Seccomp::AllowList { dns, tcp_client, receive_sockets } => {
            let allowed = smtpd_rules_for(dns, tcp_client, receive_sockets)?;
            let mut rules: Rules = ZYGOTE_EXTRA
                .iter()
                .filter(|(nr, _)| !allowed.contains_key(nr))
                .map(|&(nr, _)| (nr, Vec::new()))
                .collect();
            rules.insert(libc::SYS_clone, Vec::new());
            rules.insert(libc::SYS_tgkill, vec![rule(vec![cond(0, Len::Dword, Op::Ne, u64::from(me))?])?]);
            rules
        }
        Seccomp::DenyList { may_fork: true, .. } => return Ok(None),
        Seccomp::DenyList { may_fork: false, .. } => {
            let mut rules: Rules = NO_PROCESS.iter().map(|&(nr, _)| (nr, Vec::new())).collect();
            rules.insert(libc::SYS_clone, vec![rule(vec![cond(0, Len::Qword, Op::MaskedEq(NO_FORK), 0)?])?]);
            rules
        }
    }))
}

/// Installs a forked child's [`tail`].
pub fn install_tail(profile: Seccomp) -> Result<(), SandboxError> {
    if let Some(tail) = tail(profile)? {
        seccompiler::apply_filter(&tail)?;
    }
    Ok(())
}

/// Installs `filters`; returns how many system calls their list names.
/// Filters stack: the kernel applies the strictest answer of all.
pub fn install(filters: Compiled) -> Result<usize, SandboxError> {
    let Compiled { no_clone3, main, count } = filters;
    // The main filter goes last: installing a filter takes prctl and
    // seccomp calls that smtpd's allow-list would kill.
    match seccompiler::apply_filter_all_threads(&no_clone3) {
        Ok(()) => {}
        // A kernel without seccomp filters: say so and carry on with the
        // other layers.
        Err(seccompiler::Error::Seccomp(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(
                "warning: sandbox: this kernel has no seccomp filters ({e}): system calls are not restricted"
            );
            return Ok(0);
        }
        Err(e) => return Err(e.into()),
    }
    seccompiler::apply_filter_all_threads(&main)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_for_this_architecture() {
        let mut lists =
            vec![smtpd_rules().unwrap(), smtpd_dns_rules().unwrap(), smtpd_rules_for(false, true, false).unwrap()];
        for may_exec in [false, true] {
            for may_fork in [false, true] {
                lists.push(deny_rules(may_exec, may_fork).unwrap());
            }
        }
        for rules in lists {
            assert!(compile(rules, SeccompAction::KillProcess, SeccompAction::Allow).is_ok());
        }
    }

    #[test]
    fn smtpd_list_has_no_process_or_file_creation() {
        let rules = smtpd_rules().unwrap();
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_kill,
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_chroot,
            libc::SYS_unshare,
            libc::SYS_mount,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_mprotect,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_kill,
        ] {
            assert!(!rules.contains_key(&forbidden), "syscall {forbidden} must not be allowed in smtpd");
        }
        // The entries are unique: a duplicate would hide a mistake.
        assert_eq!(SMTPD_PLAIN.len(), SMTPD_PLAIN.iter().map(|e| e.0).collect::<std::collections::BTreeSet<_>>().len());
    }

    /// Issue 5: a daemon that may neither run a program nor make a
    /// process (the queue, the lmtp and smtp agents) is denied both, and
    /// the namespaces; one that may (pipe) only the common list.
    #[test]
    fn no_exec_no_fork_deny_both_and_the_full_profile_neither() {
        let closed = deny_rules(false, false).unwrap();
        for nr in [libc::SYS_execve, libc::SYS_execveat, libc::SYS_ptrace, libc::SYS_unshare] {
            assert!(closed.contains_key(&nr), "must deny syscall {nr}");
        }
        assert_eq!(closed[&libc::SYS_clone].len(), CLONE_NAMESPACES.len() + 1);
        let open = deny_rules(true, true).unwrap();
        for nr in [libc::SYS_execve, libc::SYS_execveat] {
            assert!(!open.contains_key(&nr), "a daemon that may exec must be able to ({nr})");
        }
        assert!(open.contains_key(&libc::SYS_ptrace) && open.contains_key(&libc::SYS_unshare));
        assert_eq!(open[&libc::SYS_clone].len(), CLONE_NAMESPACES.len());
        // cleanup and anvil: no program, but the clone rule of the common list.
        let no_exec = deny_rules(false, true).unwrap();
        assert!(no_exec.contains_key(&libc::SYS_execve));
        assert_eq!(no_exec[&libc::SYS_clone].len(), CLONE_NAMESPACES.len());
    }

    /// A zygote's filter may allow more than its children's profile, but
    /// only what each child's tail takes back: for the allow-list, every
    /// call the zygote adds is killed by the tail (clone and tgkill to
    /// another process included); for a deny-list without fork, the
    /// process-creating calls. Both compile.
    #[test]
    fn the_tail_takes_back_all_a_zygote_adds() {
        for (dns, tcp_client, receive_sockets) in [(false, false, false), (true, false, true), (false, true, false)] {
            let profile = Seccomp::AllowList { dns, tcp_client, receive_sockets };
            let children = smtpd_rules_for(dns, tcp_client, receive_sockets).unwrap();
            let zygote = zygote_rules(profile).unwrap();
            let tail = tail_rules(profile, 42).unwrap().expect("an allow-list always has a tail");
            for nr in zygote.keys().filter(|nr| !children.contains_key(nr)) {
                assert!(tail.contains_key(nr), "syscall {nr}: the zygote allows it and no child takes it back");
                assert!(tail[nr].is_empty(), "syscall {nr}: the tail kills it whatever its arguments");
            }
            for (nr, conditions) in &children {
                assert!(zygote.contains_key(nr), "syscall {nr} of the children is not in their zygote's list");
                if *nr != libc::SYS_tgkill {
                    assert_eq!(format!("{conditions:?}"), format!("{:?}", zygote[nr]), "syscall {nr} changed");
                }
            }
            assert!(tail[&libc::SYS_clone].is_empty() && tail[&libc::SYS_tgkill].len() == 1);
            assert!(compile(zygote, SeccompAction::KillProcess, SeccompAction::Allow).is_ok());
            assert!(compile(tail, SeccompAction::Allow, SeccompAction::KillProcess).is_ok());
        }
        for may_exec in [false, true] {
            let tail = tail_rules(Seccomp::DenyList { may_exec, may_fork: false }, 42).unwrap().expect("a tail");
            assert!(tail.contains_key(&libc::SYS_clone));
            #[cfg(target_arch = "x86_64")]
            assert!(tail.contains_key(&libc::SYS_fork) && tail.contains_key(&libc::SYS_vfork));
            assert!(tail_rules(Seccomp::DenyList { may_exec, may_fork: true }, 42).unwrap().is_none());
            assert_eq!(
                zygote_rules(Seccomp::DenyList { may_exec, may_fork: false }).unwrap().keys().collect::<Vec<_>>(),
                deny_rules(may_exec, true).unwrap().keys().collect::<Vec<_>>()
            );
        }
    }

    /// Milters and policy servers on `inet:` add TCP client sockets and
    /// nothing else: no bind, no datagram socket.
    #[test]
    fn tcp_filters_add_only_stream_sockets() {
        let plain = smtpd_rules().unwrap();
        let tcp = smtpd_rules_for(false, true, false).unwrap();
        assert!(tcp.keys().all(|nr| plain.contains_key(nr)), "no new system call");
        assert_eq!(tcp[&libc::SYS_socket].len(), 3);
        assert!(!tcp.contains_key(&libc::SYS_bind));
    }

    #[test]
    fn reverse_lookup_adds_only_inet_sockets_and_bind() {
        let plain = smtpd_rules().unwrap();
        let dns = smtpd_dns_rules().unwrap();
        assert!(compile(dns.clone(), SeccompAction::KillProcess, SeccompAction::Allow).is_ok());
        let added: Vec<i64> = dns.keys().filter(|nr| !plain.contains_key(nr)).copied().collect();
        assert_eq!(added, vec![libc::SYS_bind]);
        // socket stays argument-filtered: one rule per allowed domain.
        assert_eq!(plain[&libc::SYS_socket].len(), 1);
        assert_eq!(dns[&libc::SYS_socket].len(), 3);
        for forbidden in [libc::SYS_execve, libc::SYS_openat, libc::SYS_listen, libc::SYS_clone, libc::SYS_clone3] {
            assert!(!dns.contains_key(&forbidden), "syscall {forbidden} must not be allowed in smtpd");
        }
    }
}
