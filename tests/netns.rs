// The netns test helper itself: namespaces and veth links appear, carry real packets, and
// disappear on Drop, on panic, and (via the reaper) after the test process was killed.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use futures::TryStreamExt;
use support::netns::{self, owner_pid};
use support::process::pid_alive;
use support::{NetNs, veth_pair, veth_to_root};

fn root_links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ping(from: &NetNs, to: &str) {
    let out = from.exec(&["ping", "-c", "1", "-W", "2", to]);
    assert!(
        out.status.success(),
        "ping {to} from {} failed: {}{}",
        from.name(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Interface names unique to this process, short enough for the kernel's 15-byte limit.
fn if_names(tag: &str) -> (String, String) {
    let id = std::process::id() % 100_000;
    (format!("tt{tag}{id}a"), format!("tt{tag}{id}b"))
}

#[test]
fn veth_joined_namespaces_ping_both_ways_and_vanish_on_drop() {
    let (a_if, b_if) = if_names("p");
    let (a_name, b_name);
    {
        let a = NetNs::new("ping-a").unwrap();
        let b = NetNs::new("ping-b").unwrap();
        a_name = a.name().to_owned();
        b_name = b.name().to_owned();
        veth_pair(&a, &a_if, &b, &b_if).unwrap();
        a.exec_ok(&["ip", "addr", "add", "198.18.0.1/30", "dev", &a_if])
            .unwrap();
        b.exec_ok(&["ip", "addr", "add", "198.18.0.2/30", "dev", &b_if])
            .unwrap();
        ping(&a, "198.18.0.2");
        ping(&b, "198.18.0.1");
        // The links live only in the namespaces, never in the root one.
        assert!(!root_links().contains(&a_if));
        let listed = netns::list().unwrap();
        assert!(
            listed.contains(&a_name) && listed.contains(&b_name),
            "{listed:?}"
        );
    }
    let listed = netns::list().unwrap();
    assert!(
        !listed.contains(&a_name) && !listed.contains(&b_name),
        "left behind: {listed:?}"
    );
    let links = root_links();
    assert!(
        !links.contains(&a_if) && !links.contains(&b_if),
        "left behind: {links}"
    );
}

#[test]
fn root_link_carries_packets_and_dies_with_its_namespace() {
    let (root_if, ns_if) = if_names("o");
    {
        let ns = NetNs::new("root-link").unwrap();
        veth_to_root(&ns, &ns_if, &root_if).unwrap();
        assert!(root_links().contains(&root_if));
        // A /32 on each side and no route: only the peer address is reachable.
        let root_ip = format!("198.19.{}.1", std::process::id() % 250);
        let ns_ip = format!("198.19.{}.2", std::process::id() % 250);
        let out = Command::new("ip")
            .args([
                "addr",
                "add",
                &format!("{root_ip}/32"),
                "peer",
                &ns_ip,
                "dev",
                &root_if,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/32"),
            "peer",
            &root_ip,
            "dev",
            &ns_if,
        ])
        .unwrap();
        ping(&ns, &root_ip);
    }
    assert!(
        !root_links().contains(&root_if),
        "root end {root_if} survived its namespace"
    );
}

#[test]
fn namespaces_are_removed_when_the_test_body_panics() {
    let (a_if, b_if) = if_names("x");
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let a = NetNs::new("panic-a").unwrap();
        let b = NetNs::new("panic-b").unwrap();
        names
            .lock()
            .unwrap()
            .extend([a.name().to_owned(), b.name().to_owned()]);
        veth_pair(&a, &a_if, &b, &b_if).unwrap();
        panic!("test body fails with namespaces alive");
    });
    assert!(result.is_err(), "the body should have panicked");
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    let listed = netns::list().unwrap();
    for name in &names {
        assert!(
            !listed.contains(name),
            "{name} survived the panic: {listed:?}"
        );
    }
    assert!(!root_links().contains(&a_if));
}

#[test]
fn run_sees_the_namespace_interfaces_not_the_roots() {
    let (a_if, b_if) = if_names("r");
    let a = NetNs::new("run-a").unwrap();
    let b = NetNs::new("run-b").unwrap();
    veth_pair(&a, &a_if, &b, &b_if).unwrap();
    let dev_names = |text: &str| -> Vec<String> {
        text.lines()
            .skip(2)
            .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_owned()))
            .collect()
    };
    let read_dev = || std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    let root_before = dev_names(&read_dev());
    let inside = dev_names(&a.run(read_dev).unwrap());
    let root_after = dev_names(&read_dev());

    let mut sorted = inside.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec!["lo".to_owned(), a_if.clone()],
        "inside {}",
        a.name()
    );
    assert!(!root_before.contains(&a_if) && !root_before.contains(&b_if));
    // The calling thread never left the root namespace.
    assert_eq!(root_before, root_after);
}

#[test]
fn run_propagates_a_panic_from_the_closure() {
    let a = NetNs::new("run-panic").unwrap();
    let result = std::panic::catch_unwind(|| a.run(|| panic!("inside the namespace")));
    assert!(result.is_err());
}

#[tokio::test]
async fn netlink_handle_lists_the_namespace_links() {
    let (a_if, b_if) = if_names("n");
    let a = NetNs::new("nl-a").unwrap();
    let b = NetNs::new("nl-b").unwrap();
    veth_pair(&a, &a_if, &b, &b_if).unwrap();
    let handle = b.netlink().await.unwrap();
    let links: Vec<_> = handle.link().get().execute().try_collect().await.unwrap();
    let mut names: Vec<String> = links
        .iter()
        .filter_map(|l| {
            l.attributes.iter().find_map(|a| match a {
                netlink_packet_route::link::LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
        })
        .collect();
    names.sort();
    assert_eq!(names, vec!["lo".to_owned(), b_if]);
}

#[test]
fn spawned_process_runs_inside_and_dies_with_its_guard() {
    let a = NetNs::new("spawn").unwrap();
    let mut child = a.spawn(&["sleep", "1000"]).unwrap();
    let pid = child.pid();
    // `ip netns exec` joins the namespace before exec: wait until the pid is sleep itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        != "sleep"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "child never became sleep"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let child_ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let ns_ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(a.path()).unwrap());
    assert_eq!(child_ns.to_string_lossy(), format!("net:[{ns_ino}]"));
    child.check_running().unwrap();
    drop(child);
    assert!(!pid_alive(pid), "sleep {pid} outlived its guard");
}

#[test]
fn owner_pid_is_read_from_names_with_dashes_in_the_label() {
    assert_eq!(owner_pid("tt-a-b-123-4"), Some(123));
    assert_eq!(owner_pid("tt-x-9-0"), Some(9));
    assert_eq!(owner_pid("tt-9-0"), None);
    assert_eq!(owner_pid("other-x-9-0"), None);
}

const CHILD_ENV: &str = "TT_NETNS_HELPER_CHILD";

/// Run only as a child of `namespaces_of_a_killed_test_process_are_reaped`.
#[test]
#[ignore = "helper process for namespaces_of_a_killed_test_process_are_reaped"]
fn helper_holds_a_namespace_until_killed() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let ns = NetNs::new("killed").unwrap();
    println!("NETNS={}", ns.name());
    std::thread::sleep(std::time::Duration::from_secs(600));
}

#[test]
fn namespaces_of_a_killed_test_process_are_reaped() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_holds_a_namespace_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let name = BufReader::new(stdout)
        .lines()
        .map(|l| l.unwrap())
        .find_map(|l| l.strip_prefix("NETNS=").map(str::to_owned))
        .expect("child printed no namespace");
    child.kill().unwrap(); // SIGKILL: no Drop runs in the child
    child.wait().unwrap();
    assert!(
        netns::list().unwrap().contains(&name),
        "{name} should outlive a SIGKILLed owner"
    );
    let reaped = netns::reap_stale().unwrap();
    assert!(reaped.contains(&name), "reaper missed {name}: {reaped:?}");
    assert!(!netns::list().unwrap().contains(&name));
}
