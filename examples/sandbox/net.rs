// Builds the sandbox's namespaces and links from a `Layout`: the VNet bridge namespace (also
// the router between the node subnets, the internet namespace and the root link), the nodes
// and the internet. The root namespace gets one veth end with a /30 address, nothing else.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use super::layout::{
    BRIDGE, INET_GW, INET_IP, Layout, NODE_IF, NodeSpec, VNET_INET_IF, VNET_MTU, VNET_ROOT_IF,
};
use super::state::Recorder;

pub fn build(layout: &Layout, rec: &mut Recorder) -> anyhow::Result<()> {
    let vnet = &layout.vnet_ns;
    add_netns(vnet, rec)?;
    exec(vnet, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    ip(&["-n", vnet, "link", "add", BRIDGE, "type", "bridge"])?;
    ip(&[
        "-n",
        vnet,
        "link",
        "set",
        BRIDGE,
        "mtu",
        &VNET_MTU.to_string(),
        "up",
    ])?;
    for subnet in [0u8, 1] {
        ip(&[
            "-n",
            vnet,
            "addr",
            "add",
            &format!("198.18.{subnet}.1/24"),
            "dev",
            BRIDGE,
        ])?;
    }

    // Root <-> VNet: recorded first, so a crash right after creating it still gets cleaned.
    rec.root_link(&layout.root_if)?;
    ip(&[
        "link",
        "add",
        &layout.root_if,
        "type",
        "veth",
        "peer",
        "name",
        VNET_ROOT_IF,
        "netns",
        vnet,
    ])?;
    ip(&[
        "addr",
        "add",
        &format!("{}/30", layout.root_ip),
        "dev",
        &layout.root_if,
    ])?;
    ip(&["link", "set", &layout.root_if, "up"])?;
    ip(&[
        "-n",
        vnet,
        "addr",
        "add",
        &format!("{}/30", layout.vnet_root_ip),
        "dev",
        VNET_ROOT_IF,
    ])?;
    ip(&["-n", vnet, "link", "set", VNET_ROOT_IF, "up"])?;
    // The root namespace has no route to the node subnets (and must not get one): what the
    // nodes send to the API server leaves the VNet with the VNet's own /30 address.
    nft(
        vnet,
        &format!(
            "table ip sandbox {{\n chain post {{\n  type nat hook postrouting priority srcnat;\n  oifname \"{VNET_ROOT_IF}\" masquerade\n }}\n}}\n"
        ),
    )?;

    let inet = &layout.inet_ns;
    add_netns(inet, rec)?;
    ip(&[
        "link",
        "add",
        VNET_INET_IF,
        "netns",
        vnet,
        "type",
        "veth",
        "peer",
        "name",
        NODE_IF,
        "netns",
        inet,
    ])?;
    ip(&[
        "-n",
        vnet,
        "addr",
        "add",
        &format!("{INET_GW}/24"),
        "dev",
        VNET_INET_IF,
    ])?;
    ip(&["-n", vnet, "link", "set", VNET_INET_IF, "up"])?;
    ip(&[
        "-n",
        inet,
        "addr",
        "add",
        &format!("{INET_IP}/24"),
        "dev",
        NODE_IF,
    ])?;
    ip(&["-n", inet, "link", "set", NODE_IF, "up"])?;
    // Back to the node subnets only: the internet knows nothing of pod CIDRs.
    ip(&[
        "-n",
        inet,
        "route",
        "add",
        "198.18.0.0/15",
        "via",
        &INET_GW.to_string(),
    ])?;

    for node in &layout.nodes {
        add_node(layout, node, rec)?;
    }
    Ok(())
}

fn add_node(layout: &Layout, node: &NodeSpec, rec: &mut Recorder) -> anyhow::Result<()> {
    let ns = &node.netns;
    add_netns(ns, rec)?;
    ip(&[
        "link",
        "add",
        &node.port,
        "netns",
        &layout.vnet_ns,
        "type",
        "veth",
        "peer",
        "name",
        NODE_IF,
        "netns",
        ns,
    ])?;
    ip(&[
        "-n",
        &layout.vnet_ns,
        "link",
        "set",
        &node.port,
        "master",
        BRIDGE,
        "up",
    ])?;
    ip(&[
        "-n",
        ns,
        "link",
        "set",
        NODE_IF,
        "mtu",
        &VNET_MTU.to_string(),
        "up",
    ])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/{}", node.ip, node.prefix_len),
        "dev",
        NODE_IF,
    ])?;
    // A real node has a default route; proxy ARP for the pods' 169.254.1.1 needs one.
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        &node.gateway.to_string(),
    ])?;
    exec(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    Ok(())
}

fn add_netns(name: &str, rec: &mut Recorder) -> anyhow::Result<()> {
    rec.namespace(name)?;
    ip(&["netns", "add", name]).with_context(|| format!("create netns {name}"))?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

/// `argv` inside namespace `ns`.
pub fn exec(ns: &str, argv: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(argv))
}

fn nft(ns: &str, ruleset: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run nft in {ns}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .with_context(|| format!("feed nft in {ns}"))?;
    }
    let out = child.wait_with_output().context("wait for nft")?;
    if !out.status.success() {
        bail!(
            "nft in {ns} failed: {}\n{ruleset}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
