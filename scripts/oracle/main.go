// Command oracle prints cyclonus's verdict for every (source pod, destination pod, probe)
// cell of a simulated cluster. Input (argument 1, JSON):
//
//	{"policiesDir": "<dir of NetworkPolicy files>",
//	 "namespaces": {"<ns>": {"<label>": "<value>"}},
//	 "pods": [{"namespace", "name", "ip", "labels": {}, "ports": [{"name", "port", "protocol"}]}],
//	 "probes": [{"port": 80, "protocol": "TCP"}]}
//
// Output (stdout): one JSON object per cell with the ingress, egress and overall verdicts.
// The engine is cyclonus's own: kube.ReadNetworkPoliciesFromPath, then
// matcher.BuildNetworkPolicies(true, ...), then IsTrafficAllowed per cell.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/mattfenwick/cyclonus/pkg/kube"
	"github.com/mattfenwick/cyclonus/pkg/matcher"
	v1 "k8s.io/api/core/v1"
)

type port struct {
	Name     string `json:"name"`
	Port     int    `json:"port"`
	Protocol string `json:"protocol"`
}

type pod struct {
	Namespace string            `json:"namespace"`
	Name      string            `json:"name"`
	IP        string            `json:"ip"`
	Labels    map[string]string `json:"labels"`
	Ports     []port            `json:"ports"`
}

type probe struct {
	Port     int    `json:"port"`
	Protocol string `json:"protocol"`
}

type input struct {
	PoliciesDir string                       `json:"policiesDir"`
	Namespaces  map[string]map[string]string `json:"namespaces"`
	Pods        []pod                        `json:"pods"`
	Probes      []probe                      `json:"probes"`
}

type cell struct {
	From     string `json:"from"`
	To       string `json:"to"`
	Port     int    `json:"port"`
	Protocol string `json:"protocol"`
	Ingress  bool   `json:"ingress"`
	Egress   bool   `json:"egress"`
	Allowed  bool   `json:"allowed"`
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: oracle <input.json>")
		os.Exit(2)
	}
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		fail(err)
	}
	var in input
	if err := json.Unmarshal(raw, &in); err != nil {
		fail(err)
	}
	pols, err := kube.ReadNetworkPoliciesFromPath(in.PoliciesDir)
	if err != nil {
		fail(err)
	}
	engine := matcher.BuildNetworkPolicies(true, pols)
	peer := func(p pod) *matcher.TrafficPeer {
		nsLabels := map[string]string{}
		for k, v := range in.Namespaces[p.Namespace] {
			nsLabels[k] = v
		}
		// The API server adds this label to every namespace; cyclonus does not.
		nsLabels["kubernetes.io/metadata.name"] = p.Namespace
		return &matcher.TrafficPeer{
			IP: p.IP,
			Internal: &matcher.InternalPeer{
				PodLabels:       p.Labels,
				NamespaceLabels: nsLabels,
				Namespace:       p.Namespace,
			},
		}
	}
	enc := json.NewEncoder(os.Stdout)
	for _, src := range in.Pods {
		for _, dst := range in.Pods {
			for _, pr := range in.Probes {
				// A named port resolves against the destination's container ports.
				name := ""
				for _, cp := range dst.Ports {
					if cp.Port == pr.Port && cp.Protocol == pr.Protocol {
						name = cp.Name
					}
				}
				res := engine.IsTrafficAllowed(&matcher.Traffic{
					Source:           peer(src),
					Destination:      peer(dst),
					ResolvedPort:     pr.Port,
					ResolvedPortName: name,
					Protocol:         v1.Protocol(pr.Protocol),
				})
				c := cell{
					From:     src.Namespace + "/" + src.Name,
					To:       dst.Namespace + "/" + dst.Name,
					Port:     pr.Port,
					Protocol: pr.Protocol,
					Ingress:  res.Ingress.IsAllowed(),
					Egress:   res.Egress.IsAllowed(),
					Allowed:  res.IsAllowed(),
				}
				if err := enc.Encode(c); err != nil {
					fail(err)
				}
			}
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "oracle:", err)
	os.Exit(2)
}
