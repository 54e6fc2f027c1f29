// Command kstatus reads one Kubernetes object (JSON or YAML) on stdin and prints the status that
// Flux and other kstatus clients compute for it, as {"status": ..., "message": ...}.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	raw, err := io.ReadAll(in)
	if err != nil {
		return fmt.Errorf("reading stdin: %w", err)
	}
	// YAMLToJSON also accepts JSON, which is YAML.
	document, err := yaml.YAMLToJSON(raw)
	if err != nil {
		return fmt.Errorf("stdin is not one JSON or YAML object: %w", err)
	}
	// Unstructured's own decoder keeps integers as int64, which kstatus needs for metadata.generation.
	object := &unstructured.Unstructured{}
	if err := object.UnmarshalJSON(document); err != nil {
		return fmt.Errorf("stdin must hold one Kubernetes object with apiVersion and kind: %w", err)
	}
	result, err := status.Compute(object)
	if err != nil {
		return fmt.Errorf("computing the status: %w", err)
	}
	return json.NewEncoder(out).Encode(verdict{Status: result.Status.String(), Message: result.Message})
}
