//! `TYNAMO.CTL`: the operator commands `tynamo ctl` sends over RESP, served by the controller
//! leader (core 0 of a controller host). Any other core answers with a redirect to it.
//!
//! ```text
//! TYNAMO.CTL QUERY [num]                      bulk: the configuration as JSON (-1: latest)
//! TYNAMO.CTL STATUS                           bulk: configuration, controller, groups as JSON
//! TYNAMO.CTL GROUPS                           bulk: this host's group replicas as JSON (any
//!                                             host answers, from its own view)
//! TYNAMO.CTL JOIN <client-id> <seq> (<host-id> <peer-addr> <client-addr> <cores>)+
//! TYNAMO.CTL LEAVE <client-id> <seq> <host-id>+
//! TYNAMO.CTL MOVE <client-id> <seq> <shard> <group>
//!                                             integer: the configuration the change produced
//! -REDIRECT <ip:port>                         ask the controller leader's core 0 there
//! -TRYAGAIN ...                               no controller leader known right now
//! ```
//!
//! Changes are exactly-once: the controller's session table answers a retry of (client id,
//! seq) with the first answer. Reads (QUERY, STATUS) go through a ReadIndex: linearizable.
//! Every change is served live: MOVE moves a shard between groups, JOIN adds hosts and the
//! groups their cores call for (created by the hosts when they see the configuration,
//! `replica`), LEAVE retires the groups with a replica on a leaving host (their shards move to
//! the others, then their replicas are removed). A leaving host must keep running until
//! `tynamo ctl status` shows none of its replicas left: its groups hand their shards over from
//! it. A group's replicas live on several hosts, so `tynamo ctl status` asks every host for its
//! replicas (GROUPS) and shows each group as its leader's replica reports it.

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};

use crate::controller::{self, Command as CtlCommand, HostSpec, Op as CtlOp, Reply};
use crate::resp::frame::{put_bulk, put_error, put_integer};

use super::config::HostAddrs;
use super::control::{config_json, host_addr_text};
use super::executor::{CoreCtx, GroupView};
use super::group::{GroupReply, ReplySlot};
use super::machine::ControllerQuery;
use crate::shard::migration::Phase;

/// What the connection does with a `TYNAMO.CTL` request.
pub enum CtlPending {
    Now(BytesMut),
    Wait {
        slot: ReplySlot<Reply>,
        render: Render,
    },
}

/// How a controller reply becomes a RESP reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Render {
    Config,
    Status,
    Change,
}

fn now_error(text: &str) -> CtlPending {
    let mut out = BytesMut::new();
    put_error(&mut out, text.as_bytes());
    CtlPending::Now(out)
}

fn number<T: std::str::FromStr>(arg: Option<&Bytes>, what: &str) -> Result<T, String> {
    arg.and_then(|a| std::str::from_utf8(a).ok())
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("ERR TYNAMO.CTL: {what} is missing or not a number"))
}

fn text(arg: Option<&Bytes>, what: &str) -> Result<String, String> {
    arg.and_then(|a| std::str::from_utf8(a).ok())
        .map(str::to_string)
        .ok_or_else(|| format!("ERR TYNAMO.CTL: {what} is missing or not UTF-8"))
}

/// Parses a change command after `JOIN`/`LEAVE`/`MOVE`: (client id, seq, op).
fn parse_change(sub: &str, args: &[Bytes]) -> Result<CtlCommand, String> {
    let client_id: u64 = number(args.first(), "client id")?;
    let seq: u64 = number(args.get(1), "seq")?;
    if client_id == 0 || seq == 0 {
        return Err("ERR TYNAMO.CTL: client id and seq must be non-zero".into());
    }
    let rest = &args[2.min(args.len())..];
    let op = match sub {
        "JOIN" => {
            if rest.is_empty() || rest.len() % 4 != 0 {
                return Err(
                    "ERR TYNAMO.CTL JOIN wants (host-id peer-addr client-addr cores) per host"
                        .into(),
                );
            }
            let mut hosts = Vec::new();
            for h in rest.chunks(4) {
                let id: u64 = number(h.first(), "host id")?;
                let peer: std::net::SocketAddr = text(h.get(1), "peer address")?
                    .parse()
                    .map_err(|_| format!("ERR TYNAMO.CTL JOIN: host {id}: bad peer address"))?;
                let client: std::net::SocketAddr = text(h.get(2), "client address")?
                    .parse()
                    .map_err(|_| format!("ERR TYNAMO.CTL JOIN: host {id}: bad client address"))?;
                let cores: u16 = number(h.get(3), "cores")?;
                hosts.push(HostSpec {
                    id,
                    cores,
                    addr: host_addr_text(&HostAddrs { id, peer, client }),
                });
            }
            CtlOp::Join { hosts }
        }
        "LEAVE" => {
            if rest.is_empty() {
                return Err("ERR TYNAMO.CTL LEAVE wants at least one host id".into());
            }
            let hosts = rest
                .iter()
                .map(|a| number(Some(a), "host id"))
                .collect::<Result<Vec<u64>, String>>()?;
            CtlOp::Leave { hosts }
        }
        "MOVE" => {
            if rest.len() != 2 {
                return Err("ERR TYNAMO.CTL MOVE wants a shard and a group".into());
            }
            CtlOp::Move {
                shard: number(rest.first(), "shard")?,
                group: number(rest.get(1), "group")?,
            }
        }
        other => return Err(format!("ERR TYNAMO.CTL: unknown subcommand {other}")),
    };
    let command = CtlCommand { client_id, seq, op };
    command
        .check_bounds()
        .map_err(|e| format!("ERR TYNAMO.CTL: {e}"))?;
    Ok(command)
}

/// Where to send a controller request this core cannot serve.
fn redirect(ctx: &CoreCtx) -> CtlPending {
    let plan = &ctx.plan;
    let known = ctx.view.controller.leader_host.load(Ordering::Relaxed);
    let here = plan.node_of_host(ctx.cfg.id).is_some();
    let target = if known != 0 && !(known == ctx.cfg.id && ctx.core == 0) {
        Some(known)
    } else if here && ctx.core != 0 {
        // This host's core 0 runs a controller replica and knows more.
        Some(ctx.cfg.id)
    } else if !here {
        plan.hosts.first().copied()
    } else {
        None
    };
    match target.and_then(|h| ctx.client_addr(h, 0)) {
        Some(addr) => now_error(&format!("REDIRECT {addr}")),
        None => now_error("TRYAGAIN no controller leader right now (election in progress)"),
    }
}

/// Handles `TYNAMO.CTL <args>` (args without the command name).
pub fn handle(ctx: &CoreCtx, args: &[Bytes]) -> CtlPending {
    let Some(sub) = args.first() else {
        return now_error("ERR TYNAMO.CTL wants QUERY, STATUS, GROUPS, JOIN, LEAVE or MOVE");
    };
    let sub = String::from_utf8_lossy(sub).to_ascii_uppercase();
    let rest = &args[1..];
    let request = match sub.as_str() {
        "QUERY" => match rest.first() {
            None => Ok((None, Render::Config, -1)),
            Some(_) if rest.len() > 1 => {
                Err("ERR TYNAMO.CTL QUERY takes at most one number".into())
            }
            Some(_) => number::<i64>(rest.first(), "configuration number")
                .map(|n| (None, Render::Config, n)),
        },
        "STATUS" if rest.is_empty() => Ok((None, Render::Status, -1)),
        "STATUS" => Err("ERR TYNAMO.CTL STATUS takes no argument".into()),
        "GROUPS" if rest.is_empty() => {
            let mut out = BytesMut::new();
            put_bulk(&mut out, host_groups_json(ctx).to_string().as_bytes());
            return CtlPending::Now(out);
        }
        "GROUPS" => Err("ERR TYNAMO.CTL GROUPS takes no argument".into()),
        "MOVE" | "JOIN" | "LEAVE" => parse_change(&sub, rest).map(|c| (Some(c), Render::Change, 0)),
        other => Err(format!(
            "ERR TYNAMO.CTL: unknown subcommand {other} (QUERY, STATUS, GROUPS, JOIN, LEAVE, MOVE)"
        )),
    };
    let (change, render, num) = match request {
        Ok(r) => r,
        Err(e) => return now_error(&e),
    };
    let Some(group) = ctx.controller.as_ref() else {
        return redirect(ctx);
    };
    let mut g = group.borrow_mut();
    if !g.is_leader() {
        drop(g);
        return redirect(ctx);
    }
    let slot = match change {
        Some(command) => g.submit_write(command),
        None => g.submit_read(ControllerQuery { num }),
    };
    CtlPending::Wait { slot, render }
}

/// Writes the reply for a controller outcome.
pub fn render(ctx: &CoreCtx, render: Render, reply: GroupReply<Reply>, out: &mut BytesMut) {
    let reply = match reply {
        GroupReply::Done(r) => r,
        GroupReply::NotLeader { .. } => {
            if let CtlPending::Now(b) = redirect(ctx) {
                out.extend_from_slice(&b);
            }
            return;
        }
        GroupReply::Unavailable(why) => {
            put_error(out, format!("TRYAGAIN {why}").as_bytes());
            return;
        }
    };
    match (render, reply) {
        (_, Reply::Err(e)) => put_error(out, format!("ERR controller refused: {e}").as_bytes()),
        (Render::Change, Reply::Ok { num }) => put_integer(out, i64::try_from(num).unwrap_or(-1)),
        (Render::Config, Reply::Config(c)) => put_bulk(out, config_json(&c).to_string().as_bytes()),
        (Render::Status, Reply::Config(c)) => {
            put_bulk(out, status_json(ctx, &c).to_string().as_bytes())
        }
        (_, other) => put_error(
            out,
            format!("ERR unexpected controller reply {other:?}").as_bytes(),
        ),
    }
}

/// `TYNAMO.CTL STATUS`: the configuration, the controller, every group of the configuration
/// with this host's replica's view of it where it has one, the transfers in flight at those
/// replicas, and this host's replicas (`replicas`, as GROUPS). `tynamo ctl status` completes it
/// with every other host's GROUPS.
fn status_json(ctx: &CoreCtx, c: &controller::Configuration) -> Value {
    let ctl = match &ctx.controller {
        Some(g) => {
            let s = g.borrow().raw().status();
            json!({
                "leader": ctx.plan.host_of_node(s.leader).unwrap_or(0),
                "term": s.term,
                "commit": s.commit,
                "applied": s.applied,
                "replicas": ctx.plan.hosts.iter().enumerate()
                    .map(|(i, h)| json!({"node_id": i + 1, "host": h, "core": 0}))
                    .collect::<Vec<_>>(),
            })
        }
        None => Value::Null,
    };
    // Hosts of the recent configurations that the latest no longer lists: a host that left
    // keeps running until its groups handed their shards over, and `tynamo ctl status` asks
    // it too, so the operator sees when it may be stopped.
    let mut departed = serde_json::Map::new();
    if let Some(g) = &ctx.controller {
        let g = g.borrow();
        let sm = &g.machine().sm;
        for num in c.num.saturating_sub(DEPARTED_CONFIGS)..c.num {
            let Ok(old) = sm.query(num as i64) else {
                continue;
            };
            for (id, h) in &old.hosts {
                if !c.hosts.contains_key(id) {
                    departed.insert(id.to_string(), json!({"id": id, "addr": h.addr}));
                }
            }
        }
    }
    let groups: Vec<Value> = c
        .groups
        .iter()
        .map(|(&id, g)| {
            let local = ctx.view.group(id);
            let at = |f: &dyn Fn(&GroupView) -> Value| local.as_deref().map_or(Value::Null, f);
            json!({
                "id": id,
                "leader": at(&|v| json!(v.leader_slot().map_or(0, |s| s.host))),
                "term": at(&|v| json!(v.term.load(Ordering::Relaxed))),
                "commit": at(&|v| json!(v.commit.load(Ordering::Relaxed))),
                "applied": at(&|v| json!(v.applied.load(Ordering::Relaxed))),
                "config_num": at(&|v| json!(v.migration().config_num)),
                "shards": c.shards_of(id).len(),
                "replicas": g.replicas.iter()
                    .map(|r| json!({"node_id": r.node_id, "host": r.slot.host, "core": r.slot.core}))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    let local = host_groups_json(ctx);
    let transfers: Vec<Value> = local["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| {
            let (group, config_num) = (r["group"].clone(), r["config_num"].clone());
            r["in_flight"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| {
                    json!({
                        "group": group,
                        "shard": t["shard"],
                        "state": t["state"],
                        "peer_group": t["peer_group"],
                        "config_num": config_num,
                    })
                })
        })
        .collect();
    json!({
        "seen_from": ctx.cfg.id,
        "config": config_json(c),
        "controller": ctl,
        "groups": groups,
        "transfers": transfers,
        "replicas": local["replicas"],
        "departed_hosts": departed.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    })
}

/// Configurations back from the latest whose hosts `STATUS` still reports when they left.
const DEPARTED_CONFIGS: u64 = 64;

/// `TYNAMO.CTL GROUPS`: the group replicas this host runs (on every core), each as its replica
/// sees its group, and the groups whose replica this host removed.
pub fn host_groups_json(ctx: &CoreCtx) -> Value {
    let replicas: Vec<Value> = ctx
        .view
        .groups()
        .iter()
        .map(|v| {
            let m = v.migration();
            let leader = v.leader_slot();
            let in_flight: Vec<Value> = m
                .in_flight
                .iter()
                .filter_map(|&(shard, phase)| {
                    let (state, peer) = match phase {
                        Phase::Serving => return None,
                        Phase::Importing { from } => ("importing", from),
                        Phase::Confirming { from } => ("confirming", from),
                        Phase::Exporting { to } => ("exporting", to),
                    };
                    Some(json!({"shard": shard, "state": state, "peer_group": peer}))
                })
                .collect();
            json!({
                "group": v.id(),
                "core": v.spec.core,
                "node_id": v.spec.node,
                "role": v.role_name(),
                "leader_host": leader.map(|s| s.host),
                "leader_core": leader.map(|s| s.core),
                "term": v.term.load(Ordering::Relaxed),
                "commit": v.commit.load(Ordering::Relaxed),
                "applied": v.applied.load(Ordering::Relaxed),
                "config_num": m.config_num,
                "retired": m.retired,
                "serving": m.serving,
                "in_flight": in_flight,
            })
        })
        .collect();
    json!({
        "host": ctx.cfg.id,
        "replicas": replicas,
        "removed": ctx.view.removed().into_iter().collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<Bytes> {
        list.iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    #[test]
    fn change_commands_parse_into_controller_commands_and_bad_ones_say_why() {
        let join = parse_change(
            "JOIN",
            &args(&["7", "1", "4", "127.0.0.1:7131", "127.0.0.1:7031", "2"]),
        )
        .unwrap();
        assert_eq!((join.client_id, join.seq), (7, 1));
        assert_eq!(
            join.op,
            CtlOp::Join {
                hosts: vec![HostSpec {
                    id: 4,
                    cores: 2,
                    addr: "127.0.0.1:7131/127.0.0.1:7031".into()
                }]
            }
        );
        let leave = parse_change("LEAVE", &args(&["7", "2", "3", "4"])).unwrap();
        assert_eq!(leave.op, CtlOp::Leave { hosts: vec![3, 4] });
        let mv = parse_change("MOVE", &args(&["7", "3", "5", "2"])).unwrap();
        assert_eq!(mv.op, CtlOp::Move { shard: 5, group: 2 });
        for (sub, bad, why) in [
            ("JOIN", &["7", "1", "4", "127.0.0.1:1"][..], "per host"),
            (
                "JOIN",
                &["7", "1", "4", "nope", "127.0.0.1:1", "2"],
                "bad peer address",
            ),
            ("LEAVE", &["7", "1"], "at least one host"),
            ("MOVE", &["7", "1", "5"], "a shard and a group"),
            ("MOVE", &["0", "1", "5", "2"], "non-zero"),
            ("MOVE", &["x", "1", "5", "2"], "client id"),
            ("MOVE", &["7", "1", "70000", "2"], "shard"),
        ] {
            let e = parse_change(sub, &args(bad)).unwrap_err();
            assert!(e.contains(why), "{sub} {bad:?}: {e}");
        }
    }
}
