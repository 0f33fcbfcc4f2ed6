//go:build tools

// Package tools pins the upstream commands built from this module.
//
// The control plane (tests, `rayfleet dev`):
//
//	go build k8s.io/kubernetes/cmd/kube-apiserver
//	go build k8s.io/kubernetes/cmd/kube-controller-manager
//	go build ./cmd/etcd
//
// The kind nodes of the e2e cluster (kubeadm's control plane, a real kubelet running real containers):
//
//	go build k8s.io/kubernetes/cmd/kubeadm
//	go build k8s.io/kubernetes/cmd/kube-scheduler
//	go build k8s.io/kubernetes/cmd/kubelet
//	go build k8s.io/kubernetes/cmd/kube-proxy
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubeadm"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
