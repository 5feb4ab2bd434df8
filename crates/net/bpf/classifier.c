// vinfra's in-kernel traffic classifier: a tc program at ingress and egress of each VM NIC
// tap (tcx hooks; a clsact qdisc where tcx is missing).
//
// It classifies and counts every frame, and forwards the common one itself: a unicast frame
// from a VM to another VM of this host on the same bridge goes straight to the destination's
// tap (bpf_redirect), skipping the bridge's receive, lookup and forward; everything else
// (group destinations, other hosts, other domains, a destination not known to run at its tap
// yet) is left to the Linux bridge (TC_ACT_OK). The user-space side
// (crates/net/src/kernel.rs) loads it once per host with bpftool, pins its maps, fills
// `addrs` from the controller's address table and `taps`/`fwd` as it attaches taps, and reads
// `counters`/`pairs` every report interval.
//
// Counting once per domain (the same rule as the user-space switch):
//  * tc ingress of a tap = a frame the VM sent: always counted, classified by where the
//    destination is (this host, another host of the domain, outside the domain);
//  * tc egress of a tap = a frame delivered to the VM: counted only when it is unicast to
//    this tap's own VM and its source is not in the domain's table (inter-domain, received).
// ARP and IPv6 neighbour discovery are counted in their own row (`neighbor`), other group
// destinations as `flood`; neither goes into the per-pair table.
//
// When the bridge is skipped: only to a tap whose VM is known to run there, i.e. a frame with
// the VM's own source MAC entered at that tap (`live`, set at ingress: the bridge learns the
// same way). A frame with a VM's MAC as source that reaches any tap from elsewhere (through the
// VXLAN port: the VM now runs on another host, as after a migration) clears it, so its frames
// go the bridge's way again, which follows the VM by the same frames (QEMU announces a
// migrated VM with RARP broadcasts). Never across bridges: the two taps must be ports of the
// same one (`taps.bridge`), since each network is its own bridge.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define ADDR_LOCAL 1
#define ADDR_REMOTE 2

#define ROW_INTRA 0
#define ROW_INTER_SERVER 1
#define ROW_INTER_DOMAIN 2
#define ROW_FLOOD 3
#define ROW_NEIGHBOR 4
#define ROW_ERRORS 5
#define ROW_PAIRS_FULL 6
#define ROWS 8

struct counter {
	__u64 packets;
	__u64 bytes;
};

struct pair_key {
	__u8 src[6];
	__u8 dst[6];
};

struct pair_val {
	__u64 packets;
	__u64 bytes;
	__u32 class_row;
	// The `addrs` generation class_row was computed under: while it is current, a frame of
	// a known pair costs one hash lookup, not two.
	__u32 gen;
	// The pair-ageing round (meta slot 2) the entry was created in: an entry user space
	// deleted as idle and the frames re-create is a new flow record (larger flow_seq), which
	// the controller counts in full instead of diffing it against the old one. Set on the
	// creating CPU only; user space takes the largest over the CPUs.
	__u32 flow;
	__u32 pad;
};

// MAC (first six bytes, two zero bytes) -> ADDR_LOCAL / ADDR_REMOTE. Absent: other domain.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} addrs SEC(".maps");

struct tap {
	// Its VM's MAC (first six bytes).
	__u64 mac;
	// The ifindex of the bridge the tap is a port of; 0: none (never forwarded to or from).
	__u32 bridge;
	// 1 while the VM is known to run at this tap (see the top of this file).
	__u32 live;
};

// Tap ifindex -> its VM and bridge, for the taps of this host.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct tap);
} taps SEC(".maps");

// A VM's MAC (first six bytes) -> its tap's ifindex, for the VMs of this host.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} fwd SEC(".maps");

// Per-CPU rows: no atomics on the hot path; user space sums the CPUs.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ROWS);
	__type(key, __u32);
	__type(value, struct counter);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pair_key);
	__type(value, struct pair_val);
} pairs SEC(".maps");

// 0: the counter epoch (unix ns), written by user space when the maps are created;
// 1: the `addrs` generation, bumped by user space after every change of `addrs`;
// 2: the pair-ageing round, bumped by user space before it deletes idle pairs;
// 3: 1 = never skip the bridge (the operator filters VM traffic on the bridge).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} meta SEC(".maps");

static __always_inline void add_row(__u32 row, __u64 len)
{
	struct counter *c = bpf_map_lookup_elem(&counters, &row);
	if (c) {
		c->packets += 1;
		c->bytes += len;
	}
}

static __always_inline __u64 mac_key(const __u8 *m)
{
	__u64 k = 0;
	__builtin_memcpy(&k, m, 6);
	return k;
}

static __always_inline __u32 generation(void)
{
	__u32 key = 1;
	__u64 *g = bpf_map_lookup_elem(&meta, &key);
	return g ? (__u32)*g : 0;
}

static __always_inline __u32 ageing_round(void)
{
	__u32 key = 2;
	__u64 *g = bpf_map_lookup_elem(&meta, &key);
	return g ? (__u32)*g : 0;
}

static __always_inline int bridge_only(void)
{
	__u32 key = 3;
	__u64 *off = bpf_map_lookup_elem(&meta, &key);
	return off && *off;
}

// Where the destination is, from the address table.
static __always_inline __u32 class_of(const struct ethhdr *eth)
{
	__u64 dst = mac_key(eth->h_dest);
	__u32 *where = bpf_map_lookup_elem(&addrs, &dst);
	if (where && *where == ADDR_LOCAL)
		return ROW_INTRA;
	if (where && *where == ADDR_REMOTE)
		return ROW_INTER_SERVER;
	return ROW_INTER_DOMAIN;
}

// Counts a unicast frame in its pair and class; `row` < 0: classify it (the pair's cached
// class while the address table has not changed). Returns the class row.
static __always_inline __u32 count_pair(const struct ethhdr *eth, int fixed_row, __u64 len)
{
	struct pair_key k;
	__builtin_memcpy(k.src, eth->h_source, 6);
	__builtin_memcpy(k.dst, eth->h_dest, 6);
	__u32 gen = generation();
	struct pair_val *v = bpf_map_lookup_elem(&pairs, &k);
	__u32 row;
	if (fixed_row >= 0)
		row = fixed_row;
	else if (v && gen != 0 && v->gen == gen)
		row = v->class_row;
	else
		row = class_of(eth);
	add_row(row, len);
	if (v) {
		v->packets += 1;
		v->bytes += len;
		v->class_row = row;
		v->gen = gen;
		return row;
	}
	struct pair_val n = {
		.packets = 1, .bytes = len, .class_row = row, .gen = gen, .flow = ageing_round()
	};
	if (bpf_map_update_elem(&pairs, &k, &n, BPF_NOEXIST) != 0)
		add_row(ROW_PAIRS_FULL, len);
	return row;
}

static __always_inline int is_neighbor(void *data, void *end, __u16 proto)
{
	if (proto == bpf_htons(ETH_P_ARP))
		return 1;
	if (proto != bpf_htons(ETH_P_IPV6))
		return 0;
	__u8 *ip6 = (__u8 *)data + sizeof(struct ethhdr);
	// Next header at offset 6, ICMPv6 type right after the 40-byte header.
	if ((void *)(ip6 + 41) > end)
		return 0;
	if (ip6[6] != 58)
		return 0;
	return ip6[40] >= 133 && ip6[40] <= 137;
}

// A frame the VM at tap `me` sent to a VM of this host: the destination's tap when the frame
// may skip the bridge (see the top of this file), else 0.
static __always_inline __u32 shortcut(const struct ethhdr *eth, __u32 in, const struct tap *me)
{
	if (!me || !me->bridge || bridge_only())
		return 0;
	__u64 dst = mac_key(eth->h_dest);
	__u32 *to = bpf_map_lookup_elem(&fwd, &dst);
	if (!to || *to == in)
		return 0;
	struct tap *t = bpf_map_lookup_elem(&taps, to);
	if (!t || !t->live || t->bridge != me->bridge)
		return 0;
	return *to;
}

// A frame the VM at tap `in` sent.
static __always_inline int from_vm(struct __sk_buff *skb, void *data, void *end)
{
	struct ethhdr *eth = data;
	__u64 len = skb->len;
	if ((void *)(eth + 1) > end) {
		add_row(ROW_ERRORS, len);
		return TC_ACT_OK;
	}
	__u32 in = skb->ifindex;
	struct tap *me = bpf_map_lookup_elem(&taps, &in);
	if (me && !me->live && me->mac == mac_key(eth->h_source))
		me->live = 1;
	if (is_neighbor(data, end, eth->h_proto)) {
		add_row(ROW_NEIGHBOR, len);
		return TC_ACT_OK;
	}
	if (eth->h_dest[0] & 1) {
		add_row(ROW_FLOOD, len);
		return TC_ACT_OK;
	}
	if (count_pair(eth, -1, len) != ROW_INTRA)
		return TC_ACT_OK;
	__u32 to = shortcut(eth, in, me);
	return to ? bpf_redirect(to, 0) : TC_ACT_OK;
}

// A frame being delivered to the VM at tap `skb->ifindex`.
static __always_inline int to_vm(struct __sk_buff *skb, void *data, void *end)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return TC_ACT_OK;
	__u64 src = mac_key(eth->h_source);
	__u32 *where = bpf_map_lookup_elem(&addrs, &src);
	if (where && *where == ADDR_LOCAL) {
		// From a VM of this host, which counted it at its tap. Not from that tap (through the
		// VXLAN port, say): the VM runs elsewhere now; stop skipping the bridge to it.
		__u32 *at = bpf_map_lookup_elem(&fwd, &src);
		if (at && *at != skb->ingress_ifindex) {
			struct tap *t = bpf_map_lookup_elem(&taps, at);
			if (t && t->live)
				t->live = 0;
		}
		return TC_ACT_OK;
	}
	// From another host of the domain (the common case): its sender's host counted it.
	if (where)
		return TC_ACT_OK;
	if (is_neighbor(data, end, eth->h_proto) || (eth->h_dest[0] & 1))
		return TC_ACT_OK;
	__u32 ifindex = skb->ifindex;
	struct tap *own = bpf_map_lookup_elem(&taps, &ifindex);
	if (!own || own->mac != mac_key(eth->h_dest))
		return TC_ACT_OK;
	count_pair(eth, ROW_INTER_DOMAIN, skb->len);
	return TC_ACT_OK;
}

SEC("tc")
int vinfra_ingress(struct __sk_buff *skb)
{
	return from_vm(skb, (void *)(long)skb->data, (void *)(long)skb->data_end);
}

SEC("tc")
int vinfra_egress(struct __sk_buff *skb)
{
	return to_vm(skb, (void *)(long)skb->data, (void *)(long)skb->data_end);
}

char LICENSE[] SEC("license") = "Apache-2.0";
