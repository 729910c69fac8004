from sglang.test.simple_eval_mixed_prefix_gsm8k import GSM8KEval, get_answer_value

from sglang_dsv4.evals.gsm8k import DATA


def test_shipped_gsm8k_sample_loads_in_sglang_run_eval():
    """The shipped file is what ``sglang.test.run_eval --gsm8k-data-path`` reads: 5 shots, then
    questions whose reference answers parse to numbers."""
    ev = GSM8KEval(num_examples=None, num_threads=1, num_shots=5, data_path=str(DATA))
    assert len(ev._lines) == 10 and ev._few_shot_prompt.count("Question:") == 5
    assert [get_answer_value(x["answer"]) for x in ev._lines][:3] == [64, 260, 160]
