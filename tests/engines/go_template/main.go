// Renders a Go text/template (what Ollama's TEMPLATE is) over Ollama-shaped data read as JSON from
// stdin: {"template": "...", "messages": [{"role": "...", "content": "..."}], "system": "..."}.
// Prints the rendered prompt to stdout, nothing else.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message
	System   string
	Prompt   string
	Response string
}

type input struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	System   string    `json:"system"`
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(in.Template)
	if err != nil {
		panic(err)
	}
	if err := tmpl.Execute(os.Stdout, Values{Messages: in.Messages, System: in.System}); err != nil {
		panic(err)
	}
}
