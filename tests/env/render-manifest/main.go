// Command render-manifest renders deploy/manifest.yaml.tmpl with Go's text/template, the
// engine the Distr Hub renders agent manifests with, from parameters in a JSON file. The
// parameters get the Go types the Hub gives them: the target secret is a string pointer (nil
// leaves the Secret out, as at the Hub's manifest endpoint), the resources a struct pointer.
//
// usage: render-manifest <template> <params.json>
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/template"
	"time"
)

type resources struct {
	MemoryLimit   string
	CPULimit      string
	MemoryRequest string
	CPURequest    string
}

type params struct {
	TargetID          string     `json:"targetId"`
	TargetSecret      *string    `json:"targetSecret"`
	LoginEndpoint     string     `json:"loginEndpoint"`
	ManifestEndpoint  string     `json:"manifestEndpoint"`
	ResourcesEndpoint string     `json:"resourcesEndpoint"`
	StatusEndpoint    string     `json:"statusEndpoint"`
	MetricsEndpoint   string     `json:"metricsEndpoint"`
	LogsEndpoint      string     `json:"logsEndpoint"`
	AgentLogsEndpoint string     `json:"agentLogsEndpoint"`
	AgentInterval     string     `json:"agentInterval"`
	AgentVersion      string     `json:"agentVersion"`
	AgentVersionID    string     `json:"agentVersionId"`
	RegistryEnabled   bool       `json:"registryEnabled"`
	RegistryHost      string     `json:"registryHost"`
	RegistryPlainHTTP bool       `json:"registryPlainHttp"`
	AgentDockerConfig string     `json:"agentDockerConfig"`
	TargetScope       string     `json:"targetScope"`
	TargetNamespace   string     `json:"targetNamespace"`
	TargetResources   *resources `json:"targetResources"`
	MetricsEnabled    bool       `json:"metricsEnabled"`
	AutohealAll       bool       `json:"autohealAll"`
	DockerSocketPath  string     `json:"dockerSocketPath"`
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: render-manifest <template> <params.json>")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "render-manifest:", err)
		os.Exit(1)
	}
}

func run(templatePath, paramsPath string) error {
	text, err := os.ReadFile(templatePath)
	if err != nil {
		return err
	}
	raw, err := os.ReadFile(paramsPath)
	if err != nil {
		return err
	}
	var p params
	if err := json.Unmarshal(raw, &p); err != nil {
		return fmt.Errorf("%s: %w", paramsPath, err)
	}
	interval, err := time.ParseDuration(p.AgentInterval)
	if err != nil {
		return fmt.Errorf("agentInterval: %w", err)
	}
	data := map[string]any{
		"targetId":          p.TargetID,
		"targetSecret":      p.TargetSecret,
		"loginEndpoint":     p.LoginEndpoint,
		"manifestEndpoint":  p.ManifestEndpoint,
		"resourcesEndpoint": p.ResourcesEndpoint,
		"statusEndpoint":    p.StatusEndpoint,
		"metricsEndpoint":   p.MetricsEndpoint,
		"logsEndpoint":      p.LogsEndpoint,
		"agentLogsEndpoint": p.AgentLogsEndpoint,
		"agentInterval":     interval,
		"agentVersion":      p.AgentVersion,
		"agentVersionId":    p.AgentVersionID,
		"registryEnabled":   p.RegistryEnabled,
		"registryHost":      p.RegistryHost,
		"registryPlainHttp": p.RegistryPlainHTTP,
		"agentDockerConfig": p.AgentDockerConfig,
		"targetScope":       p.TargetScope,
		"targetNamespace":   p.TargetNamespace,
		"targetResources":   p.TargetResources,
		"metricsEnabled":    p.MetricsEnabled,
		"autohealAll":       p.AutohealAll,
		"dockerSocketPath":  p.DockerSocketPath,
	}
	tmpl, err := template.New("manifest").Option("missingkey=error").Parse(string(text))
	if err != nil {
		return err
	}
	return tmpl.Execute(os.Stdout, data)
}
