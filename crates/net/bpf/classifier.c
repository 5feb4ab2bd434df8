// vinfra's in-kernel traffic classifier: a tc (clsact) program on each VM NIC tap.
//
// Forwarding stays in the Linux bridge; this only classifies and counts, then lets the
// frame through (TC_ACT_OK). The user-space side (crates/net/src/kernel.rs) loads it once per
// host with bpftool, pins its maps, fills `addrs`/`ports` from the controller's address
// table and reads `counters`/`pairs` every report interval.
//
// Counting once per domain (the same rule as the user-space switch):
//  * tc ingress of a tap = a frame the VM sent: always counted, classified by where the
//    destination is (this host, another host of the domain, outside the domain);
//  * tc egress of a tap = a frame delivered to the VM: counted only when it is unicast to
//    this tap's own VM and its source is not in the domain's table (inter-domain, received).
// ARP and IPv6 neighbour discovery are counted in their own row (`neighbor`), other group
// destinations as `flood`; neither goes into the per-pair table.
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

// Tap ifindex -> its VM's MAC (first six bytes).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} ports SEC(".maps");

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
// 2: the pair-ageing round, bumped by user space before it deletes idle pairs.
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
// class while the address table has not changed).
static __always_inline void count_pair(const struct ethhdr *eth, int fixed_row, __u64 len)
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
		return;
	}
	struct pair_val n = {
		.packets = 1, .bytes = len, .class_row = row, .gen = gen, .flow = ageing_round()
	};
	if (bpf_map_update_elem(&pairs, &k, &n, BPF_NOEXIST) != 0)
		add_row(ROW_PAIRS_FULL, len);
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

static __always_inline int classify(struct __sk_buff *skb, int egress)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u64 len = skb->len;

	if ((void *)(eth + 1) > end) {
		if (!egress)
			add_row(ROW_ERRORS, len);
		return TC_ACT_OK;
	}
	int neigh = is_neighbor(data, end, eth->h_proto);
	int group = eth->h_dest[0] & 1;
	if (!egress) {
		if (neigh) {
			add_row(ROW_NEIGHBOR, len);
			return TC_ACT_OK;
		}
		if (group) {
			add_row(ROW_FLOOD, len);
			return TC_ACT_OK;
		}
		count_pair(eth, -1, len);
		return TC_ACT_OK;
	}
	if (neigh || group)
		return TC_ACT_OK;
	// From the domain (the common case): its sender's host counted it. One lookup.
	__u64 src = mac_key(eth->h_source);
	if (bpf_map_lookup_elem(&addrs, &src))
		return TC_ACT_OK;
	__u32 ifindex = skb->ifindex;
	__u64 *own = bpf_map_lookup_elem(&ports, &ifindex);
	if (!own || *own != mac_key(eth->h_dest))
		return TC_ACT_OK;
	count_pair(eth, ROW_INTER_DOMAIN, len);
	return TC_ACT_OK;
}

SEC("tc")
int vinfra_ingress(struct __sk_buff *skb)
{
	return classify(skb, 0);
}

SEC("tc")
int vinfra_egress(struct __sk_buff *skb)
{
	return classify(skb, 1);
}

char LICENSE[] SEC("license") = "Apache-2.0";
